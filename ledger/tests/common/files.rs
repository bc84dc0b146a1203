//! The ledger's file framing, read and written independently of the library (from the format
//! documented in `storage.rs`), for tests that damage stored files on purpose.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

/// `entries.log` record header: `len u32 | index u64 | header crc32c u32 | payload crc32c u32`.
pub const HEADER: usize = 20;
pub const LOG: &str = "entries.log";
pub const TREE: &str = "tree.hashes";
pub const CHECKPOINTS: &str = "checkpoints.log";
pub const META: &str = "ledger.json";

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

/// One `entries.log` record for leaf `index` with valid checksums.
pub fn frame(index: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    let header_crc = crc32c::crc32c(&out);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Byte ranges of the records of an intact `entries.log` (checks the framing as it goes).
pub fn records(log: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < log.len() {
        let len = le32(&log[off..]) as usize;
        let index = u64::from_le_bytes(log[off + 4..off + 12].try_into().unwrap());
        assert_eq!(index, out.len() as u64, "record at byte {off}");
        assert_eq!(le32(&log[off + 12..]), crc32c::crc32c(&log[off..off + 12]));
        out.push(off..off + HEADER + len);
        off += HEADER + len;
    }
    assert_eq!(off, log.len());
    out
}

/// The record (entry index) holding byte `byte`.
pub fn record_of(records: &[Range<usize>], byte: usize) -> u64 {
    records.iter().position(|r| r.contains(&byte)).unwrap() as u64
}

/// One `checkpoints.log` record: `len u32 | crc32c(len, note) u32 | note`.
pub fn frame_checkpoint(note: &str) -> Vec<u8> {
    let len = (note.len() as u32).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len), note.as_bytes());
    [&len[..], &crc.to_le_bytes(), note.as_bytes()].concat()
}

/// Byte ranges of the records of an intact `checkpoints.log`, and their notes.
pub fn checkpoint_records(data: &[u8]) -> Vec<(Range<usize>, String)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < data.len() {
        let len = le32(&data[off..]) as usize;
        let note = std::str::from_utf8(&data[off + 8..off + 8 + len]).unwrap();
        assert_eq!(frame_checkpoint(note), data[off..off + 8 + len]);
        out.push((off..off + 8 + len, note.to_string()));
        off += 8 + len;
    }
    out
}

/// Copies the (flat) ledger directory `from` into `to`, keeping file modes (the key is 0600).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        assert!(e.file_type().unwrap().is_file(), "{:?}", e.path());
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Every file of the (flat) directory and its bytes.
pub fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

/// Asserts `dir` holds exactly `before` (names only on failure: the tree file is 32 MiB).
pub fn assert_unchanged(dir: &Path, before: &BTreeMap<String, Vec<u8>>, what: &str) {
    let after = snapshot(dir);
    let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&after),
        names(before),
        "{what}: files added or removed"
    );
    for (name, bytes) in before {
        assert!(after[name] == *bytes, "{what} changed {name}");
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Flips bit `bit` of byte `byte` of the file in place (flipping again restores it).
pub fn flip_bit(path: &Path, byte: usize, bit: u32) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, byte as u64).unwrap();
    b[0] ^= 1 << bit;
    f.write_all_at(&b, byte as u64).unwrap();
}
