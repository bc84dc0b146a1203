//! Identical repeats of released answers: the recent ones in memory, within a size, and the
//! rest wherever the caller keeps released answers ([`KeptRepeats`]).
//!
//! An identical repeat (same scope, normalized SQL, spend asked and consent snapshot) of an
//! answer that was released is answered with that answer again and spends nothing. Memory
//! holds the most recently used answers up to [`crate::Limits::repeat_memory`] bytes; an
//! answer dropped from memory is looked up in the caller's store, and one found nowhere is run
//! and charged again (never free, never a second noisy answer for nothing).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::engine::Release;

/// Released answers kept outside the engine (the broker's kept releases on disk).
pub trait KeptRepeats: Send + Sync {
    /// The release kept under `key` ([`crate::Engine::repeat_key`]), once checked against
    /// the record of its release; `None` if there is none or it cannot be trusted. Blocking.
    fn find(&self, key: &[u8; 32]) -> Option<Release>;
}

/// A release as memory keeps it: its rows as the Arrow IPC stream that is sent and digested,
/// its mechanism as JSON text. Flat buffers, so that what it takes is what it counts (a
/// release's arrays, schema and JSON tree took about 3.4 times what their buffers and texts
/// added up to, as the allocator counted it).
pub(crate) struct Compact {
    rows: Box<[u8]>,
    mechanism: Box<str>,
    sql: Box<str>,
    epsilon: f64,
    delta: f64,
    rho: Option<f64>,
    consent_digest: [u8; 32],
    result_digest: [u8; 32],
}

/// What one kept answer takes beyond its buffers: the compact form in its `Arc`, its key and
/// entry in the map (twice: a map keeps up to half its slots spare), and in the recency order
/// (with the tree's spare room).
const OVERHEAD: usize =
    std::mem::size_of::<Compact>() + 16 + 2 * (32 + std::mem::size_of::<Entry>()) + 2 * (8 + 32);

impl Compact {
    /// The compact form of `r`; `None` if its rows do not encode (never seen: they were
    /// digested in this form).
    pub(crate) fn of(r: &Release) -> Option<Compact> {
        Some(Compact {
            rows: crate::release::ipc_stream(&r.schema, &r.batches)
                .ok()?
                .into_boxed_slice(),
            mechanism: r.mechanism.to_string().into_boxed_str(),
            sql: r.sql.clone().into_boxed_str(),
            epsilon: r.epsilon,
            delta: r.delta,
            rho: r.rho,
            consent_digest: r.consent_digest,
            result_digest: r.result_digest,
        })
    }

    /// Bytes it takes in memory.
    fn bytes(&self) -> usize {
        self.rows.len() + self.mechanism.len() + self.sql.len() + OVERHEAD
    }

    /// The release again; `None` if it does not decode (then it is as if not kept).
    pub(crate) fn release(&self) -> Option<Release> {
        let reader =
            arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(&self.rows[..]), None)
                .ok()?;
        let schema = reader.schema();
        let batches = reader.collect::<Result<Vec<_>, _>>().ok()?;
        Some(Release {
            schema,
            batches,
            epsilon: self.epsilon,
            delta: self.delta,
            rho: self.rho,
            sql: self.sql.to_string(),
            consent_digest: self.consent_digest,
            result_digest: self.result_digest,
            mechanism: serde_json::from_str(&self.mechanism).ok()?,
            repeated: false,
        })
    }
}

/// The in-memory part: least recently used answers dropped past `capacity` bytes.
pub(crate) struct RepeatCache {
    entries: HashMap<[u8; 32], Entry>,
    /// Keys by their last use, oldest first.
    order: BTreeMap<u64, [u8; 32]>,
    bytes: usize,
    capacity: usize,
    clock: u64,
}

struct Entry {
    kept: Arc<Compact>,
    used: u64,
}

impl RepeatCache {
    pub(crate) fn new(capacity: usize) -> RepeatCache {
        RepeatCache {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            bytes: 0,
            capacity,
            clock: 0,
        }
    }

    /// The answer under `key`, now the most recently used (decode it outside any lock).
    pub(crate) fn get(&mut self, key: &[u8; 32]) -> Option<Arc<Compact>> {
        self.clock += 1;
        let e = self.entries.get_mut(key)?;
        self.order.remove(&e.used);
        e.used = self.clock;
        self.order.insert(self.clock, *key);
        Some(e.kept.clone())
    }

    /// Keeps `kept` under `key`, dropping the least recently used past the capacity. An
    /// answer larger than the whole capacity is not kept in memory.
    pub(crate) fn insert(&mut self, key: [u8; 32], kept: Compact) {
        let bytes = kept.bytes();
        if let Some(old) = self.entries.remove(&key) {
            self.bytes -= old.kept.bytes();
            self.order.remove(&old.used);
        }
        if bytes > self.capacity {
            return;
        }
        self.clock += 1;
        self.entries.insert(
            key,
            Entry {
                kept: Arc::new(kept),
                used: self.clock,
            },
        );
        self.order.insert(self.clock, key);
        self.bytes += bytes;
        while self.bytes > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&oldest) {
                self.bytes -= e.kept.bytes();
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

    use super::{Compact, RepeatCache};
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
        let kept = |rows| Compact::of(&release(rows)).unwrap();
        let one = kept(100).bytes();
        let mut c = RepeatCache::new(3 * one);
        for k in 0..3u8 {
            c.insert([k; 32], kept(100));
        }
        assert_eq!(c.len(), 3);
        // 0 is used again, so 1 is the least recently used when 3 comes.
        assert!(c.get(&[0; 32]).is_some());
        c.insert([3; 32], kept(100));
        assert_eq!(c.len(), 3);
        assert!(c.get(&[1; 32]).is_none());
        for k in [0u8, 2, 3] {
            assert!(c.get(&[k; 32]).is_some(), "{k}");
        }
        assert!(c.bytes() <= 3 * one);
        // Inserting a key again replaces it without counting it twice.
        c.insert([3; 32], kept(100));
        assert_eq!((c.len(), c.bytes()), (3, 3 * one));
        // What memory gives back is the release that was kept.
        let back = c.get(&[3; 32]).unwrap().release().unwrap();
        let was = release(100);
        assert_eq!(back.batches, was.batches);
        assert_eq!(back.schema, was.schema);
        assert_eq!((back.sql, back.mechanism), (was.sql, was.mechanism));
        // One answer larger than the whole capacity is not kept, and drops nothing.
        c.insert([9; 32], kept(100_000));
        assert!(c.get(&[9; 32]).is_none());
        assert_eq!(c.len(), 3);
    }
}
