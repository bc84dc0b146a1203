//! Durable files under the ledger directory.
//!
//! - `entries.log`: the log itself, authoritative. Records are
//!   `len u32 | index u64 | header crc32c u32 | payload crc32c u32 | payload` (little endian),
//!   where the header CRC covers `len` and `index` and the payload is the leaf bytes. A batch
//!   of records is written with one `write` and made durable with one `fdatasync` (group
//!   commit) before any of its appends is acknowledged.
//! - `tree.hashes`: every complete node hash of the Merkle tree, 32 bytes each, at its in-order
//!   position (`merkle::position`), memory-mapped so proofs read stored nodes instead of
//!   recomputing. It is derived from the log: on open every stored node is checked against the
//!   log, nodes missing after a crash (zero or past the end) are recomputed, and any other
//!   mismatch is corruption.
//! - `checkpoints.log`: every checkpoint the ledger signed, `len u32 | crc32c u32 | note`.
//!
//! Torn tails (a record cut short by a crash, or zeros past the last record) are truncated and
//! reported; every other inconsistency is an [`Error::Corrupt`] naming the first bad entry.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use memmap2::{Mmap, MmapMut};

use crate::error::{Error, Result};
use crate::merkle::{self, Hash, NodeSource};

/// Largest payload accepted (an entry's leaf bytes).
pub const MAX_RECORD: usize = 16 << 20;
const HEADER: usize = 20;
/// Largest checkpoint note a torn tail may claim (the ledger's notes are under 1 KiB: origin
/// at most 256 bytes, key name at most 64).
const MAX_CHECKPOINT: usize = 4096;
/// Tree file growth step, in nodes (32 MiB).
const TREE_CHUNK_NODES: u64 = 1 << 20;

/// Name of the log file.
pub const LOG_FILE: &str = "entries.log";
/// Name of the node hash file.
pub const TREE_FILE: &str = "tree.hashes";
/// Name of the checkpoint file.
pub const CHECKPOINT_FILE: &str = "checkpoints.log";

fn crc(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |c, p| crc32c::crc32c_append(c, p))
}

/// Appends one record for leaf `index` to `buf`.
pub fn encode_record(buf: &mut Vec<u8>, index: u64, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("payload length checked against MAX_RECORD");
    let len_b = len.to_le_bytes();
    let idx_b = index.to_le_bytes();
    buf.extend_from_slice(&len_b);
    buf.extend_from_slice(&idx_b);
    buf.extend_from_slice(&crc(&[&len_b, &idx_b]).to_le_bytes());
    buf.extend_from_slice(&crc(&[payload]).to_le_bytes());
    buf.extend_from_slice(payload);
}

/// A record found by [`scan_log`]: where its payload is.
#[derive(Debug, Clone, Copy)]
pub struct RecordPos {
    /// Offset of the record header.
    pub offset: u64,
    /// Payload length.
    pub len: u32,
}

impl RecordPos {
    /// Byte range of the payload within the file.
    pub fn payload(&self) -> std::ops::Range<usize> {
        let start = self.offset as usize + HEADER;
        start..start + self.len as usize
    }
}

/// What scanning the log found.
#[derive(Debug)]
pub struct LogScan {
    /// Every intact record, in order.
    pub records: Vec<RecordPos>,
    /// Where the intact records end.
    pub end: u64,
    /// Bytes of torn tail after `end` (to be truncated).
    pub torn_bytes: u64,
}

/// Checks the framing, order and checksums of every record in `data` (the whole log).
pub fn scan_log(data: &[u8]) -> Result<LogScan> {
    let mut records = Vec::new();
    let mut off = 0usize;
    let corrupt = |index: u64, reason: String| Error::Corrupt {
        index,
        file: LOG_FILE,
        reason,
    };
    while off < data.len() {
        let index = records.len() as u64;
        let rest = &data[off..];
        let torn = |records: Vec<RecordPos>| {
            Ok(LogScan {
                records,
                end: off as u64,
                torn_bytes: rest.len() as u64,
            })
        };
        if rest.iter().all(|&b| b == 0) || rest.len() < HEADER {
            // A crash left zeros or less than a header: a torn tail.
            return torn(records);
        }
        let len_b = &rest[0..4];
        let idx_b = &rest[4..12];
        let hcrc = u32::from_le_bytes(rest[12..16].try_into().expect("4 bytes"));
        let pcrc = u32::from_le_bytes(rest[16..20].try_into().expect("4 bytes"));
        if crc(&[len_b, idx_b]) != hcrc {
            return Err(corrupt(index, "record header checksum mismatch".into()));
        }
        let len = u32::from_le_bytes(len_b.try_into().expect("4 bytes"));
        let claimed = u64::from_le_bytes(idx_b.try_into().expect("8 bytes"));
        if claimed != index {
            return Err(corrupt(
                index,
                format!(
                    "record claims index {claimed}: an entry is missing, duplicated or out of order"
                ),
            ));
        }
        if len as usize > MAX_RECORD {
            return Err(corrupt(index, "record length out of range".into()));
        }
        if rest.len() < HEADER + len as usize {
            // The header is intact but the payload was cut short by a crash.
            return torn(records);
        }
        if crc(&[&rest[HEADER..HEADER + len as usize]]) != pcrc {
            return Err(corrupt(
                index,
                "entry bytes changed (checksum mismatch)".into(),
            ));
        }
        records.push(RecordPos {
            offset: off as u64,
            len,
        });
        off += HEADER + len as usize;
    }
    Ok(LogScan {
        records,
        end: off as u64,
        torn_bytes: 0,
    })
}

/// Maps a whole file read-only (an empty file maps to an empty slice).
pub fn map_readonly(file: &File) -> Result<Option<Mmap>> {
    if file.metadata()?.len() == 0 {
        return Ok(None);
    }
    // SAFETY: the ledger directory is locked by this process (see `Ledger::open`); no other
    // process changes these files while they are mapped, and this process only appends.
    #[allow(unsafe_code)]
    let map = unsafe { Mmap::map(file)? };
    Ok(Some(map))
}

/// Reads the payload of the record at `pos`.
pub fn read_record(file: &File, pos: RecordPos) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; pos.len as usize];
    file.read_exact_at(&mut buf, pos.offset + HEADER as u64)?;
    Ok(buf)
}

/// Opens (creating if needed) a file for appending.
pub fn open_append(path: &Path) -> Result<File> {
    Ok(OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?)
}

/// Writes all of `buf` at the end of `file` and makes it durable.
pub fn append_durable(file: &mut File, buf: &[u8]) -> Result<()> {
    file.write_all(buf)?;
    file.sync_data()?;
    Ok(())
}

/// The memory-mapped node hash file.
pub struct TreeFile {
    file: File,
    map: MmapMut,
}

impl TreeFile {
    /// Opens or creates the tree file at `path`.
    pub fn open(path: &Path) -> Result<TreeFile> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)?;
        if file.metadata()?.len() < TREE_CHUNK_NODES * 32 {
            file.set_len(TREE_CHUNK_NODES * 32)?;
        }
        let map = Self::map(&file)?;
        Ok(TreeFile { file, map })
    }

    /// Opens the tree file for reading only: a private copy-on-write mapping, so nothing
    /// this process does can change the file (used by verification).
    pub fn open_readonly(path: &Path) -> Result<TreeFile> {
        let file = File::open(path)?;
        // SAFETY: as for `map_readonly`; a private mapping never writes to the file.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::MmapOptions::new().map_copy(&file)? };
        Ok(TreeFile { file, map })
    }

    fn map(file: &File) -> Result<MmapMut> {
        // SAFETY: as for `map_readonly`: the directory is locked by this process and only this
        // `TreeFile` writes the file, through this map.
        #[allow(unsafe_code)]
        let map = unsafe { MmapMut::map_mut(file)? };
        Ok(map)
    }

    fn capacity(&self) -> u64 {
        self.map.len() as u64 / 32
    }

    /// The stored hash at in-order position `pos`, or `None` past the end of the file.
    pub fn get(&self, pos: u64) -> Option<Hash> {
        if pos >= self.capacity() {
            return None;
        }
        let at = pos as usize * 32;
        Some(self.map[at..at + 32].try_into().expect("32 bytes"))
    }

    /// Stores `hash` at position `pos`, growing the file as needed.
    pub fn put(&mut self, pos: u64, hash: &Hash) -> Result<()> {
        if pos >= self.capacity() {
            let nodes = (pos / TREE_CHUNK_NODES + 1) * TREE_CHUNK_NODES;
            self.map.flush()?;
            self.file.set_len(nodes * 32)?;
            self.map = Self::map(&self.file)?;
        }
        let at = pos as usize * 32;
        self.map[at..at + 32].copy_from_slice(hash);
        Ok(())
    }

    /// Stores the nodes that leaf `index` completes, given its leaf hash, reading the left
    /// siblings from the file. Returns nothing; errors only on I/O.
    pub fn push_leaf(&mut self, index: u64, leaf: &Hash) -> Result<()> {
        let mut hash = *leaf;
        for (level, i) in merkle::nodes_completed_by(index) {
            if level > 0 {
                let left = self.node(level - 1, 2 * i);
                hash = merkle::node_hash(&left, &hash);
            }
            self.put(merkle::position(level, i), &hash)?;
        }
        Ok(())
    }

    /// Writes dirty pages to disk.
    pub fn flush(&self) -> Result<()> {
        self.map.flush()?;
        Ok(())
    }
}

impl NodeSource for TreeFile {
    fn node(&self, level: u32, index: u64) -> Hash {
        self.get(merkle::position(level, index))
            .unwrap_or([0u8; 32])
    }
}

/// Encodes one checkpoint record.
pub fn encode_checkpoint(note: &str) -> Vec<u8> {
    let len = u32::try_from(note.len()).expect("checkpoint notes are small");
    let mut buf = Vec::with_capacity(8 + note.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc(&[&len.to_le_bytes(), note.as_bytes()]).to_le_bytes());
    buf.extend_from_slice(note.as_bytes());
    buf
}

/// Reads every checkpoint record; returns them and the length of the intact prefix (a torn
/// tail after it is to be truncated).
pub fn scan_checkpoints(data: &[u8]) -> Result<(Vec<String>, u64)> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        let rest = &data[off..];
        if rest.len() < 8 || rest.iter().all(|&b| b == 0) {
            break;
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let want = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if rest.len() < 8 + len {
            // A torn tail, unless the length field itself was damaged: then the length is
            // implausible, or the rest holds a whole record of another length (its checksum
            // covers the length as written). A write cut short holds no whole record.
            let changed = len > MAX_CHECKPOINT
                || (0..=rest.len() - 8)
                    .any(|l| crc(&[&(l as u32).to_le_bytes(), &rest[8..8 + l]]) == want);
            if changed {
                return Err(Error::Corrupt {
                    index: out.len() as u64,
                    file: CHECKPOINT_FILE,
                    reason: format!("checkpoint record {} length field changed", out.len()),
                });
            }
            break;
        }
        let note = &rest[8..8 + len];
        if crc(&[&rest[0..4], note]) != want {
            return Err(Error::Corrupt {
                index: out.len() as u64,
                file: CHECKPOINT_FILE,
                reason: format!("checkpoint record {} checksum mismatch", out.len()),
            });
        }
        let text = std::str::from_utf8(note).map_err(|_| Error::Corrupt {
            index: out.len() as u64,
            file: CHECKPOINT_FILE,
            reason: "checkpoint is not UTF-8".into(),
        })?;
        out.push(text.to_string());
        off += 8 + len;
    }
    Ok((out, off as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(payloads: &[&[u8]]) -> Vec<u8> {
        let mut buf = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            encode_record(&mut buf, i as u64, p);
        }
        buf
    }

    #[test]
    fn scan_accepts_intact_logs() {
        let log = log_of(&[b"a", b"bb", b""]);
        let scan = scan_log(&log).unwrap();
        assert_eq!(scan.records.len(), 3);
        assert_eq!(scan.end, log.len() as u64);
        assert_eq!(scan.torn_bytes, 0);
        assert_eq!(&log[scan.records[1].payload()], b"bb");
    }

    #[test]
    fn every_cut_of_the_last_record_is_a_torn_tail() {
        let full = log_of(&[b"first", b"second record"]);
        let first_end = HEADER + 5;
        for cut in first_end + 1..full.len() {
            let scan = scan_log(&full[..cut]).unwrap();
            assert_eq!(scan.records.len(), 1, "cut at {cut}");
            assert_eq!(scan.end, first_end as u64);
            assert_eq!(scan.torn_bytes, (cut - first_end) as u64);
        }
        let mut zeros = full.clone();
        zeros.extend_from_slice(&[0u8; 4096]);
        let scan = scan_log(&zeros).unwrap();
        assert_eq!(scan.records.len(), 2);
        assert_eq!(scan.torn_bytes, 4096);
    }

    #[test]
    fn every_flipped_bit_is_corruption_naming_the_entry() {
        let log = log_of(&[b"one", b"two", b"three"]);
        let starts = [0, HEADER + 3, 2 * HEADER + 6];
        for byte in 0..log.len() {
            for bit in 0..8 {
                let mut bad = log.clone();
                bad[byte] ^= 1 << bit;
                let entry = starts.iter().rposition(|&s| s <= byte).unwrap() as u64;
                match scan_log(&bad) {
                    Err(Error::Corrupt { index, .. }) => assert_eq!(index, entry, "byte {byte}"),
                    other => panic!("byte {byte} bit {bit}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn reordered_duplicated_or_removed_records_are_named() {
        let parts: Vec<Vec<u8>> = (0..3u64)
            .map(|i| {
                let mut b = Vec::new();
                encode_record(&mut b, i, format!("entry {i}").as_bytes());
                b
            })
            .collect();
        for (order, first_bad) in [([0, 2, 1], 1), ([0, 0, 1], 1), ([1, 2, 2], 0)] {
            let log: Vec<u8> = order.iter().flat_map(|&i| parts[i].clone()).collect();
            match scan_log(&log) {
                Err(Error::Corrupt { index, reason, .. }) => {
                    assert_eq!(index, first_bad);
                    assert!(reason.contains("missing, duplicated or out of order"));
                }
                other => panic!("{order:?}: {other:?}"),
            }
        }
        let removed: Vec<u8> = [0, 2].iter().flat_map(|&i| parts[i].clone()).collect();
        assert!(matches!(
            scan_log(&removed),
            Err(Error::Corrupt { index: 1, .. })
        ));
    }

    #[test]
    fn checkpoints_round_trip_and_detect_flips() {
        let mut data = encode_checkpoint("a\n1\nroot\n");
        data.extend(encode_checkpoint("b\n2\nroot\n"));
        let (cps, end) = scan_checkpoints(&data).unwrap();
        assert_eq!(
            cps,
            vec!["a\n1\nroot\n".to_string(), "b\n2\nroot\n".to_string()]
        );
        assert_eq!(end, data.len() as u64);
        let (cps, _) = scan_checkpoints(&data[..data.len() - 3]).unwrap();
        assert_eq!(cps.len(), 1, "torn tail dropped");
        let mut bad = data.clone();
        bad[10] ^= 4;
        assert!(matches!(scan_checkpoints(&bad), Err(Error::Corrupt { .. })));
        // A flipped bit in a length field is corruption, not a torn tail to truncate, even
        // when the length it claims runs past the end of the file.
        for byte in [0, 1, 2, 3, 8 + 9, 8 + 9 + 1, 8 + 9 + 3] {
            for bit in 0..8 {
                let mut bad = data.clone();
                bad[byte] ^= 1 << bit;
                let first = u64::from(byte >= 8 + 9);
                match scan_checkpoints(&bad) {
                    Err(Error::Corrupt { index, .. }) => assert_eq!(index, first),
                    other => panic!("byte {byte} bit {bit}: {other:?}"),
                }
            }
        }
    }
}
