//! Tampering is detected: flipped bits in every kind of stored file, removed, duplicated and
//! reordered entries, rewritten entries with valid checksums, forged checkpoints. The ledger
//! refuses to open and `verify` fails, both with `Error::Corrupt` naming the first bad entry
//! and the file, and neither changes any file (compared byte for byte on every structural case
//! and on a sample of the bit flips).
#![allow(clippy::unwrap_used)]

mod common;

use std::ops::Range;
use std::path::Path;

use common::files::{self, CHECKPOINTS, HEADER, LOG, META, TREE};
use common::*;
use ledger::entry::{Body, CheckpointCosigned, SignedEntry};
use ledger::ids::SubjectId;
use ledger::note::{self, SignerKey};
use ledger::{Error, Ledger, merkle};

/// A closed ledger: `world` plus 50 mixed entries, a witness cosignature and checkpoints at
/// several sizes (the last one covers every entry).
struct Fixture {
    src: tempfile::TempDir,
    size: u64,
    custodian: Actor,
    log: Vec<u8>,
    records: Vec<Range<usize>>,
}

fn fixture() -> Fixture {
    let src = tempfile::tempdir().unwrap();
    let w = world(src.path());
    for i in 0..50 {
        let l = &w.ledger;
        match i % 5 {
            0..=2 => {
                let body = consent_body(&w.custodian, &format!("c{i}"), "MRN-1", "ehr", &["GRU"]);
                l.append(w.custodian.sign(body))
            }
            3 => l.append_as_operator(receipt(&w, 0.01)),
            _ => l.append_as_operator(denied(receipt(&w, 0.0))),
        }
        .unwrap();
        if i == 20 || i == 35 {
            l.checkpoint().unwrap();
        }
        if i == 25 {
            let cp = l.checkpoint().unwrap();
            let (text, _) = note::signatures(&cp).unwrap();
            let cosig = w.witness.key.sign_note(&text).unwrap();
            let checkpoint = format!("{cp}{}\n", cosig.lines().last().unwrap());
            let body = Body::CheckpointCosigned(CheckpointCosigned { checkpoint });
            l.append(w.witness.sign(body)).unwrap();
        }
    }
    w.ledger.checkpoint().unwrap();
    let size = w.ledger.size();
    let World {
        ledger, custodian, ..
    } = w;
    drop(ledger);
    let log = std::fs::read(src.path().join(LOG)).unwrap();
    let records = files::records(&log);
    assert_eq!(records.len() as u64, size);
    Fixture {
        src,
        size,
        custodian,
        log,
        records,
    }
}

impl Fixture {
    /// A fresh copy of the ledger directory.
    fn copy(&self) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        files::copy_dir(self.src.path(), tmp.path());
        tmp
    }

    fn record(&self, i: usize) -> &[u8] {
        &self.log[self.records[i].clone()]
    }
}

/// Opens and verifies `dir`: both must fail with `Error::Corrupt`. Returns their (index, file).
fn both_corrupt(dir: &Path, what: &str) -> [(u64, &'static str); 2] {
    let open = match Ledger::open(dir, config()) {
        Err(Error::Corrupt { index, file, .. }) => (index, file),
        Err(e) => panic!("{what}: open gave {e:?}"),
        Ok(_) => panic!("{what}: the ledger opened"),
    };
    let verify = match ledger::verify(dir, &|_, _| {}) {
        Err(Error::Corrupt { index, file, .. }) => (index, file),
        other => panic!("{what}: verify gave {other:?}"),
    };
    [open, verify]
}

/// Like [`both_corrupt`], and checks that neither the failed open nor verify changed a file.
fn both_corrupt_untouched(dir: &Path, what: &str) -> [(u64, &'static str); 2] {
    let before = files::snapshot(dir);
    let got = both_corrupt(dir, what);
    files::assert_unchanged(dir, &before, what);
    got
}

#[test]
fn flipped_bits_in_entries_log_name_their_entry() {
    let f = fixture();
    let tmp = f.copy();
    let path = tmp.path().join(LOG);
    // One bit of every 97th byte, and every bit of one record (header and payload).
    let mut flips: Vec<(usize, u32)> = (0..f.log.len())
        .step_by(97)
        .map(|b| (b, b as u32 % 8))
        .collect();
    let middle = f.records[f.size as usize / 2].clone();
    flips.extend(middle.flat_map(|b| (0..8).map(move |bit| (b, bit))));
    for (n, &(byte, bit)) in flips.iter().enumerate() {
        let what = format!("entries.log byte {byte} bit {bit}");
        files::flip_bit(&path, byte, bit);
        let want = (files::record_of(&f.records, byte), LOG);
        let got = if n % 50 == 0 {
            both_corrupt_untouched(tmp.path(), &what)
        } else {
            both_corrupt(tmp.path(), &what)
        };
        assert_eq!(got, [want, want], "{what}");
        files::flip_bit(&path, byte, bit);
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        f.log,
        "every failed open left the log as it was"
    );
}

#[test]
fn removed_duplicated_or_reordered_records_name_the_first_change() {
    let f = fixture();
    let (k, n) = (f.size as usize / 2, f.size as usize);
    let r = &f.records;
    let cases = [
        (
            "record k removed",
            [&f.log[..r[k].start], &f.log[r[k].end..]].concat(),
            k,
        ),
        (
            "record k duplicated",
            [&f.log[..r[k].end], f.record(k), &f.log[r[k].end..]].concat(),
            k + 1,
        ),
        (
            "records k and k+1 swapped",
            [
                &f.log[..r[k].start],
                f.record(k + 1),
                f.record(k),
                &f.log[r[k + 1].end..],
            ]
            .concat(),
            k,
        ),
        ("record 0 removed", f.log[r[1].start..].to_vec(), 0),
        // Clean removal from the end is caught by the last checkpoint, which covers them.
        (
            "last 3 records removed",
            f.log[..r[n - 3].start].to_vec(),
            n - 3,
        ),
    ];
    for (what, log, first_bad) in cases {
        let tmp = f.copy();
        std::fs::write(tmp.path().join(LOG), log).unwrap();
        let want = (first_bad as u64, LOG);
        assert_eq!(
            both_corrupt_untouched(tmp.path(), what),
            [want, want],
            "{what}"
        );
    }
}

#[test]
fn a_rewritten_entry_with_valid_checksums_and_signature_is_caught() {
    let f = fixture();
    // An attacker holding the custodian's key rewrites a consent near the end of the log:
    // same consent id, another subject, signed again, framed with correct checksums. (Before
    // the witness cosignature, replaying the cosignature itself would refuse the new tree.)
    let has = |i: usize, what: &[u8]| f.record(i).windows(what.len()).any(|w| w == what);
    let cosigned = (0..f.size as usize)
        .find(|&i| has(i, b"checkpoint_cosigned"))
        .unwrap();
    let k = (cosigned..f.size as usize)
        .find(|&i| has(i, b"consent_granted"))
        .unwrap();
    let old = SignedEntry::from_leaf(&f.record(k)[HEADER..], true).unwrap();
    let mut entry = old.entry.clone();
    let Body::ConsentGranted(g) = &mut entry.body else {
        panic!("not a consent")
    };
    g.subject = SubjectId::new("MRN-999").unwrap();
    let forged = SignedEntry::sign(&f.custodian.key, entry).leaf_bytes();
    let r = &f.records[k];
    let log = [
        &f.log[..r.start],
        &files::frame(k as u64, &forged),
        &f.log[r.end..],
    ]
    .concat();

    // The stored node hashes still hold the old leaf hash.
    let tmp = f.copy();
    std::fs::write(tmp.path().join(LOG), &log).unwrap();
    let want = (k as u64, TREE);
    assert_eq!(
        both_corrupt_untouched(tmp.path(), "rewritten entry"),
        [want, want]
    );

    // The attacker also rebuilds tree.hashes for the new log (opening it with an emptied
    // checkpoint file does that), then puts the checkpoints back. Only the checkpoints can
    // tell now; a root mismatch cannot pinpoint the entry, so the index is only bounded:
    // from the rewritten entry to the end of the first checkpoint that covers it.
    // (An emptied checkpoint file alone is refused, the metadata knowing how many there were:
    // the attacker edits that record out too, then puts both back.)
    let cps = std::fs::read(tmp.path().join(CHECKPOINTS)).unwrap();
    let meta = std::fs::read(tmp.path().join("ledger.json")).unwrap();
    std::fs::write(tmp.path().join(CHECKPOINTS), b"").unwrap();
    std::fs::remove_file(tmp.path().join(TREE)).unwrap();
    let e = Ledger::open(tmp.path(), config()).err().unwrap();
    assert!(e.to_string().contains("checkpoints were removed"), "{e}");
    let mut stripped: serde_json::Value = serde_json::from_slice(&meta).unwrap();
    stripped.as_object_mut().unwrap().remove("reached").unwrap();
    std::fs::write(tmp.path().join("ledger.json"), stripped.to_string()).unwrap();
    drop(Ledger::open(tmp.path(), config()).unwrap());
    std::fs::write(tmp.path().join(CHECKPOINTS), &cps).unwrap();
    std::fs::write(tmp.path().join("ledger.json"), &meta).unwrap();
    let cover = files::checkpoint_records(&cps)
        .iter()
        .map(|(_, n)| ledger::state::checkpoint_of(n).unwrap().size)
        .filter(|&s| s > k as u64)
        .min()
        .unwrap();
    for (index, file) in both_corrupt_untouched(tmp.path(), "rewritten entry and tree") {
        assert_eq!(file, LOG);
        assert!(
            (k as u64..cover).contains(&index),
            "index {index}, k {k}, cover {cover}"
        );
    }
}

#[test]
fn flipped_bits_in_tree_hashes_name_the_entry_completing_the_node() {
    let f = fixture();
    let tmp = f.copy();
    let path = tmp.path().join(TREE);
    // (level, index) of stored nodes: leaves, internal nodes, a 32-leaf subtree root.
    let last = f.size - 1;
    for (level, j) in [(0, 0), (0, 7), (0, last), (1, 5), (2, 3), (3, 2), (5, 0)] {
        // Node (level, j) covers leaves [j * 2^level, (j + 1) * 2^level): its last leaf
        // completes it, and replay checks it then.
        let completed_by = ((j + 1) << level) - 1;
        assert!(completed_by < f.size);
        for bit in [0, 5] {
            let byte = 32 * merkle::position(level, j) as usize + 13;
            let what = format!("tree node ({level}, {j}) bit {bit}");
            files::flip_bit(&path, byte, bit);
            let want = (completed_by, TREE);
            assert_eq!(
                both_corrupt_untouched(tmp.path(), &what),
                [want, want],
                "{what}"
            );
            files::flip_bit(&path, byte, bit);
        }
    }
    ledger::verify(tmp.path(), &|_, _| {}).unwrap();
}

#[test]
fn flipped_bits_and_forgeries_in_checkpoints_log_are_caught() {
    let f = fixture();
    let tmp = f.copy();
    let path = tmp.path().join(CHECKPOINTS);
    let data = std::fs::read(&path).unwrap();
    let records = files::checkpoint_records(&data);
    assert!(records.len() >= 4, "checkpoints at several sizes");
    // Every bit of every record header (length and checksum); one bit of every other byte.
    let mut flips = Vec::new();
    for (r, _) in &records {
        flips.extend((r.start..r.start + 8).flat_map(|b| (0..8).map(move |bit| (b, bit))));
        flips.extend((r.start + 8..r.end).map(|b| (b, b as u32 % 8)));
    }
    for (byte, bit) in flips {
        let what = format!("checkpoints.log byte {byte} bit {bit}");
        // For checkpoints.log the index is the record's position in the file.
        let ordinal = records.iter().position(|(r, _)| r.contains(&byte)).unwrap();
        let want = (ordinal as u64, CHECKPOINTS);
        files::flip_bit(&path, byte, bit);
        assert_eq!(both_corrupt(tmp.path(), &what), [want, want], "{what}");
        files::flip_bit(&path, byte, bit);
    }
    assert_eq!(std::fs::read(&path).unwrap(), data);

    // A well-framed checkpoint signed by another key under the ledger's key name.
    let impostor = SignerKey::generate("operator").unwrap();
    for j in [0, records.len() / 2, records.len() - 1] {
        let (r, text) = &records[j];
        let (body, _) = note::signatures(text).unwrap();
        let forged = files::frame_checkpoint(&impostor.sign_note(&body).unwrap());
        let tmp = f.copy();
        std::fs::write(
            tmp.path().join(CHECKPOINTS),
            [&data[..r.start], &forged, &data[r.end..]].concat(),
        )
        .unwrap();
        let want = (j as u64, CHECKPOINTS);
        let what = format!("checkpoint {j} forged");
        assert_eq!(both_corrupt_untouched(tmp.path(), &what), [want, want]);
    }
}

#[test]
fn damaged_metadata_is_an_error_not_a_panic() {
    let f = fixture();
    let meta = std::fs::read(f.src.path().join(META)).unwrap();
    let other_key = SignerKey::generate("operator")
        .unwrap()
        .verifier()
        .to_text();
    let text = String::from_utf8(meta.clone()).unwrap();
    let start = text.find("operator+").unwrap();
    let end = start + text[start..].find('"').unwrap();
    let swapped = format!("{}{other_key}{}", &text[..start], &text[end..]);
    assert_ne!(swapped, text);
    let garbage: [(&str, Vec<u8>); 3] = [
        ("garbage", b"\x00\xff{not json".to_vec()),
        ("empty", Vec::new()),
        ("cut short", meta[..meta.len() / 2].to_vec()),
    ];
    for (what, bytes) in garbage {
        let tmp = f.copy();
        std::fs::write(tmp.path().join(META), bytes).unwrap();
        let want = (0, META);
        assert_eq!(
            both_corrupt_untouched(tmp.path(), what),
            [want, want],
            "{what}"
        );
    }
    // Another verifier key: refused too (the private key no longer matches).
    let tmp = f.copy();
    std::fs::write(tmp.path().join(META), swapped).unwrap();
    let before = files::snapshot(tmp.path());
    assert!(Ledger::open(tmp.path(), config()).is_err());
    assert!(ledger::verify(tmp.path(), &|_, _| {}).is_err());
    files::assert_unchanged(tmp.path(), &before, "swapped key");
}

#[test]
fn a_deleted_checkpoint_file_is_refused() {
    // Deleting checkpoints.log together with the last entries would otherwise go unnoticed.
    let f = fixture();
    let tmp = f.copy();
    std::fs::remove_file(tmp.path().join(CHECKPOINTS)).unwrap();
    let want = (0, CHECKPOINTS);
    assert_eq!(
        both_corrupt_untouched(tmp.path(), "deleted checkpoints.log"),
        [want, want]
    );
}

#[test]
fn an_interrupted_init_is_reported_and_never_overwritten() {
    let f = fixture();
    let tmp = f.copy();
    std::fs::remove_file(tmp.path().join(META)).unwrap();
    assert!(matches!(
        Ledger::open(tmp.path(), config()),
        Err(Error::NotInitialized)
    ));
    let before = files::snapshot(tmp.path());
    let operator = ledger::ids::PrincipalId::new("operator").unwrap();
    match Ledger::init(tmp.path(), "x.example/log", &operator, config()) {
        Err(Error::Invalid(msg)) => assert!(msg.contains("no ledger.json"), "{msg}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    files::assert_unchanged(tmp.path(), &before, "init over ledger files");
}

#[test]
fn a_rollback_of_the_log_and_its_checkpoints_is_seen() {
    // The ledger records how far it got (its last checkpoint's size and how many it stored)
    // in ledger.json: an emptied or shortened checkpoint file, with the log cut at a record
    // boundary (an approval and receipts gone), once opened and verified as a smaller ledger.
    let f = fixture();
    let cps = std::fs::read(f.src.path().join(CHECKPOINTS)).unwrap();
    let records = files::checkpoint_records(&cps);
    let cut = f.records[f.size as usize - 5].start;
    let last_cp = records.last().unwrap().0.start;
    for (what, checkpoints, log) in [
        ("emptied checkpoints", &cps[..0], &f.log[..]),
        (
            "emptied checkpoints, 5 entries cut",
            &cps[..0],
            &f.log[..cut],
        ),
        (
            "last checkpoint and 5 entries cut",
            &cps[..last_cp],
            &f.log[..cut],
        ),
    ] {
        let tmp = f.copy();
        std::fs::write(tmp.path().join(CHECKPOINTS), checkpoints).unwrap();
        std::fs::write(tmp.path().join(LOG), log).unwrap();
        let [open, verify] = both_corrupt_untouched(tmp.path(), what);
        assert_eq!(open, verify, "{what}");
        assert_eq!(open.1, CHECKPOINTS, "{what}");
        let e = Ledger::open(tmp.path(), config())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("checkpoints were removed"), "{what}: {e}");
    }
}

#[test]
fn a_stale_node_past_the_last_checkpoint_is_rebuilt_from_the_log() {
    // A crash can leave, past the last checkpoint, a node hash written through the map for an
    // append that never became durable. The tree is derived from the log: such a node is
    // rewritten on open (it once refused to open with every acknowledged entry intact); a
    // node a checkpoint covers is still refused (the flip tests above).
    let src = tempfile::tempdir().unwrap();
    let slow = ledger::Config {
        checkpoint_interval: std::time::Duration::from_secs(3600),
        ..config()
    };
    let w = world(src.path());
    drop(w);
    let (l, _) = Ledger::open(src.path(), slow).unwrap();
    let custodian = Actor::new("st-mary-2");
    l.append_as_operator(custodian.registration(ledger::ids::Role::Custodian, None))
        .unwrap();
    for i in 0..9 {
        l.append_as_operator(Body::PrincipalRegistered(
            ledger::entry::PrincipalRegistered {
                id: ledger::ids::PrincipalId::new(format!("r{i}")).unwrap(),
                role: ledger::ids::Role::Researcher,
                key: SignerKey::generate(&format!("r{i}"))
                    .unwrap()
                    .verifier()
                    .to_text(),
                subject: None,
                display_name: None,
            },
        ))
        .unwrap();
    }
    let size = l.size();
    // The directory as a crash would leave it: entries durable, no checkpoint covering the
    // last ten (copied while the ledger is open).
    let tmp = tempfile::tempdir().unwrap();
    files::copy_dir(src.path(), tmp.path());
    drop(l);
    let cps = std::fs::read(tmp.path().join(CHECKPOINTS)).unwrap();
    let covered = files::checkpoint_records(&cps)
        .iter()
        .map(|(_, n)| ledger::state::checkpoint_of(n).unwrap().size)
        .max()
        .unwrap();
    assert!(covered < size - 1, "entries past the last checkpoint");
    let byte = 32 * merkle::position(0, size - 1) as usize + 3;
    files::flip_bit(&tmp.path().join(TREE), byte, 1);
    let (l, report) = Ledger::open(tmp.path(), config()).unwrap();
    assert!(report.nodes_repaired >= 1, "{report:?}");
    assert_eq!(l.size(), size);
    drop(l);
    ledger::verify(tmp.path(), &|_, _| {}).unwrap();
}
