//! Identical repeats of released answers: the recent ones in memory, within a size, and the
//! rest wherever the caller keeps released answers ([`KeptRepeats`]).
//!
//! An identical repeat (same scope, normalized SQL, spend asked and consent snapshot) of an
//! answer that was released is answered with that answer again and spends nothing. Memory
//! holds the most recently used answers up to [`crate::Limits::repeat_memory`] bytes; an
//! answer dropped from memory is looked up in the caller's store, and one found nowhere is run
//! and charged again (never free, never a second noisy answer for nothing).

use std::collections::HashMap;

use crate::engine::Release;

/// Released answers kept outside the engine (the broker's kept releases on disk).
pub trait KeptRepeats: Send + Sync {
    /// The release kept under `key` ([`crate::Engine::repeat_key`]), once checked against
    /// the record of its release; `None` if there is none or it cannot be trusted. Blocking.
    fn find(&self, key: &[u8; 32]) -> Option<Release>;
}

/// The in-memory part: least recently used answers dropped past `capacity` bytes.
pub(crate) struct RepeatCache {
    entries: HashMap<[u8; 32], Entry>,
    bytes: usize,
    capacity: usize,
    clock: u64,
}

struct Entry {
    release: Release,
    bytes: usize,
    used: u64,
}

/// What a release holds in memory, roughly: its rows and its texts.
fn size_of(r: &Release) -> usize {
    let rows: usize = r.batches.iter().map(|b| b.get_array_memory_size()).sum();
    rows + r.sql.len() + r.mechanism.to_string().len() + 256
}

impl RepeatCache {
    pub(crate) fn new(capacity: usize) -> RepeatCache {
        RepeatCache {
            entries: HashMap::new(),
            bytes: 0,
            capacity,
            clock: 0,
        }
    }

    /// The release under `key`, now the most recently used.
    pub(crate) fn get(&mut self, key: &[u8; 32]) -> Option<Release> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(key).map(|e| {
            e.used = clock;
            e.release.clone()
        })
    }

    /// Keeps `release` under `key`, dropping the least recently used past the capacity. A
    /// release larger than the whole capacity is not kept in memory.
    pub(crate) fn insert(&mut self, key: [u8; 32], release: Release) {
        let bytes = size_of(&release);
        if let Some(old) = self.entries.remove(&key) {
            self.bytes -= old.bytes;
        }
        if bytes > self.capacity {
            return;
        }
        self.clock += 1;
        self.entries.insert(
            key,
            Entry {
                release,
                bytes,
                used: self.clock,
            },
        );
        self.bytes += bytes;
        while self.bytes > self.capacity {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some(e) = self.entries.remove(&oldest) {
                self.bytes -= e.bytes;
            }
        }
    }

    /// Bytes held (tests).
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Releases held (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::RepeatCache;
    use crate::engine::Release;

    fn release(rows: usize) -> Release {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![1i64; rows]))],
        )
        .unwrap();
        Release {
            schema,
            batches: vec![batch],
            epsilon: 1.0,
            delta: 0.0,
            rho: None,
            sql: "SELECT 1".into(),
            consent_digest: [0; 32],
            result_digest: [0; 32],
            mechanism: serde_json::Value::Null,
            repeated: false,
        }
    }

    #[test]
    fn the_least_recently_used_go_first_and_the_size_holds() {
        let one = super::size_of(&release(100));
        let mut c = RepeatCache::new(3 * one);
        for k in 0..3u8 {
            c.insert([k; 32], release(100));
        }
        assert_eq!(c.len(), 3);
        // 0 is used again, so 1 is the least recently used when 3 comes.
        assert!(c.get(&[0; 32]).is_some());
        c.insert([3; 32], release(100));
        assert_eq!(c.len(), 3);
        assert!(c.get(&[1; 32]).is_none());
        for k in [0u8, 2, 3] {
            assert!(c.get(&[k; 32]).is_some(), "{k}");
        }
        assert!(c.bytes() <= 3 * one);
        // Inserting a key again replaces it without counting it twice.
        c.insert([3; 32], release(100));
        assert_eq!((c.len(), c.bytes()), (3, 3 * one));
        // One answer larger than the whole capacity is not kept, and drops nothing.
        c.insert([9; 32], release(100_000));
        assert!(c.get(&[9; 32]).is_none());
        assert_eq!(c.len(), 3);
    }
}
