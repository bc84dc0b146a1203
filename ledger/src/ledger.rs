//! The ledger: opening, group-committed appends, proofs and checkpoints.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::entry::{Body, Entry, SignedEntry, leaf_from_parts};
use crate::error::{Error, Result};
use crate::ids::{PrincipalId, Role, Timestamp};
use crate::keyfile;
use crate::merkle::{self, Hash};
use crate::note::{self, Checkpoint, SignerKey, VerifierKey};
use crate::replay::{ReplayOptions, TreeMode, replay};
use crate::state::State;
use crate::storage::{self, CHECKPOINT_FILE, LOG_FILE, MAX_RECORD, RecordPos, TREE_FILE, TreeFile};

/// Name of the ledger's metadata file.
const META_FILE: &str = "ledger.json";
/// Name of the ledger's private key file.
pub const KEY_FILE: &str = "ledger.key";
const LOCK_FILE: &str = "LOCK";

/// How the ledger behaves. `Config::default()` suits a broker.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often the committer signs a new checkpoint when the tree has grown. Entries after
    /// the latest checkpoint are the only ones whose clean removal from the end of the log
    /// cannot be detected on open, so this bounds that window.
    pub checkpoint_interval: Duration,
    /// How far an entry's time may be from the ledger's clock on append.
    pub max_clock_skew: Duration,
    /// Most entries made durable by one fsync.
    pub max_batch: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            checkpoint_interval: Duration::from_secs(1),
            max_clock_skew: Duration::from_secs(300),
            max_batch: 4096,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    format: u32,
    origin: String,
    verifier_key: String,
    /// How far the ledger got: the size of the last checkpoint it issued and how many it had
    /// stored then. Kept here, apart from the log and the checkpoints, so that truncating
    /// them is seen (absent in ledgers from before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reached: Option<Reached>,
}

/// The last checkpoint a ledger issued.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Reached {
    size: u64,
    checkpoints: u64,
}

impl Meta {
    fn read(dir: &Path) -> Result<Meta> {
        let bytes = match std::fs::read(dir.join(META_FILE)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotInitialized);
            }
            Err(e) => return Err(e.into()),
        };
        serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
            index: 0,
            file: META_FILE,
            reason: e.to_string(),
        })
    }

    /// Writes the metadata atomically (temporary file, fsync, rename, directory fsync).
    fn write(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join("ledger.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).expect("meta serializes"),
        )?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, dir.join(META_FILE))?;
        File::open(dir)?.sync_all()?;
        Ok(())
    }

    /// Refuses a log or a checkpoint file shorter than the ledger had issued checkpoints
    /// for: a rollback (or a loss) of acknowledged entries.
    fn check_reached(&self, entries: u64, checkpoints: u64) -> Result<()> {
        let Some(r) = self.reached else {
            return Ok(());
        };
        if checkpoints < r.checkpoints {
            return Err(Error::Corrupt {
                index: checkpoints,
                file: CHECKPOINT_FILE,
                reason: format!(
                    "holds {checkpoints} checkpoints, but the ledger had stored {} (ledger.json): \
                     checkpoints were removed",
                    r.checkpoints
                ),
            });
        }
        if entries < r.size {
            return Err(Error::Corrupt {
                index: entries,
                file: LOG_FILE,
                reason: format!(
                    "holds {entries} entries, but the ledger signed a checkpoint at size {} \
                     (ledger.json): acknowledged entries were removed",
                    r.size
                ),
            });
        }
        Ok(())
    }
}

/// What opening found and did.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    /// Entries replayed.
    pub entries: u64,
    /// Bytes of a torn tail (a crash mid-append) cut from the log.
    pub truncated_bytes: u64,
    /// Node hashes recomputed because a crash left them unwritten.
    pub nodes_repaired: u64,
    /// Checkpoints found.
    pub checkpoints: usize,
}

/// An acknowledged append: durable on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The entry's index (leaf index).
    pub index: u64,
    /// Its RFC 9162 leaf hash.
    pub leaf_hash: Hash,
}

struct Pending {
    entry: Entry,
    leaf: Vec<u8>,
    key_since: u64,
    reply: SyncSender<Result<Appended>>,
}

/// Where an append's outcome arrives.
type Reply = mpsc::Receiver<Result<Appended>>;

enum Request {
    Append(Box<Pending>),
    Checkpoint(SyncSender<Result<String>>),
}

struct Shared {
    origin: String,
    signer: SignerKey,
    verifier: VerifierKey,
    log_read: File,
    offsets: RwLock<Vec<RecordPos>>,
    tree: RwLock<TreeFile>,
    size: AtomicU64,
    /// The ledger's directory and metadata (rewritten with each checkpoint's `reached`).
    dir: PathBuf,
    meta: Mutex<Meta>,
    /// Checkpoints in the checkpoint file.
    stored_checkpoints: AtomicU64,
    /// Entries the state holds: `size` plus a batch applied and not yet fsynced.
    applied: AtomicU64,
    state: RwLock<State>,
    checkpoint: RwLock<String>,
    poisoned: AtomicBool,
    config: Config,
}

/// A ledger open for appends and reads. Appends from many threads are batched into one fsync.
pub struct Ledger {
    shared: Arc<Shared>,
    tx: Option<SyncSender<Request>>,
    committer: Option<JoinHandle<()>>,
    dir: PathBuf,
    _lock: File,
}

fn lock(dir: &Path) -> Result<File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))?;
    // A process that just closed the ledger (or a child process forked while it held the
    // lock, until that child's exec) may hold it for a moment: retry briefly before refusing.
    let mut wait = std::time::Duration::from_millis(5);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(std::time::Duration::from_millis(200));
            }
            Err(std::fs::TryLockError::WouldBlock) => return Err(Error::Locked),
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
    }
}

fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read()
        .expect("ledger locks are not poisoned: no code panics while holding them")
}

fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write()
        .expect("ledger locks are not poisoned: no code panics while holding them")
}

/// Stored checkpoints (note text and parsed), the intact length and the file length.
type LoadedCheckpoints = (Vec<(String, Checkpoint)>, u64, u64);

/// Reads and signature-checks the stored checkpoints; returns them sorted by size with the
/// intact length of the file.
fn load_checkpoints(dir: &Path, key: &VerifierKey, origin: &str) -> Result<LoadedCheckpoints> {
    let path = dir.join(CHECKPOINT_FILE);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        // `init` creates the file before the ledger is first opened, so a missing file means
        // it was deleted, and with it the evidence of how far the log had grown.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Corrupt {
                index: 0,
                file: CHECKPOINT_FILE,
                reason: "the checkpoint file is missing".into(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let (notes, end) = storage::scan_checkpoints(&data)?;
    let mut out = Vec::with_capacity(notes.len());
    for (i, n) in notes.into_iter().enumerate() {
        let cp = note::open_checkpoint(key, &n, Some(origin)).map_err(|e| Error::Corrupt {
            index: i as u64,
            file: CHECKPOINT_FILE,
            reason: format!("stored checkpoint {i} does not verify: {e}"),
        })?;
        out.push((n, cp));
    }
    out.sort_by_key(|(_, cp)| cp.size);
    Ok((out, end, data.len() as u64))
}

impl Ledger {
    /// Creates a ledger in `dir` (which may exist but must hold no ledger): its key, named
    /// `operator`, and the genesis entry registering that operator. Returns the open ledger.
    pub fn init(
        dir: &Path,
        origin: &str,
        operator: &PrincipalId,
        config: Config,
    ) -> Result<Ledger> {
        if origin.is_empty()
            || origin.len() > 256
            || origin.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Error::Invalid(
                "origin must be 1 to 256 characters without spaces".into(),
            ));
        }
        std::fs::create_dir_all(dir)?;
        let guard = lock(dir)?;
        if dir.join(META_FILE).exists() {
            return Err(Error::AlreadyInitialized);
        }
        if [LOG_FILE, KEY_FILE, CHECKPOINT_FILE]
            .iter()
            .any(|f| dir.join(f).exists())
        {
            // Without ledger.json no ledger was ever initialized here, but the files may be a
            // ledger whose metadata was lost: never delete them on the user's behalf.
            return Err(Error::Invalid(
                "the directory holds ledger files but no ledger.json (an interrupted init?); \
                 remove them if they hold no ledger you need"
                    .into(),
            ));
        }
        let signer = SignerKey::generate(operator.as_str())?;
        keyfile::write_private_key(&dir.join(KEY_FILE), &signer)?;
        let meta = Meta {
            format: 1,
            origin: origin.to_string(),
            verifier_key: signer.verifier().to_text(),
            reached: None,
        };
        let genesis = Entry {
            author: operator.clone(),
            time: Timestamp::now(),
            body: Body::PrincipalRegistered(crate::entry::PrincipalRegistered {
                id: operator.clone(),
                role: Role::Operator,
                key: signer.verifier().to_text(),
                subject: None,
                display_name: None,
            }),
        };
        let sig = signer.sign_raw(&genesis.canonical_bytes());
        let leaf = leaf_from_parts(&genesis.canonical_bytes(), &sig);
        let mut buf = Vec::new();
        storage::encode_record(&mut buf, 0, &leaf);
        let mut log = storage::open_append(&dir.join(LOG_FILE))?;
        storage::append_durable(&mut log, &buf)?;
        storage::open_append(&dir.join(CHECKPOINT_FILE))?.sync_all()?;
        // The metadata is written last and atomically: a ledger without it is not initialized.
        meta.write(dir)?;
        drop(guard);
        let (ledger, _) = Ledger::open(dir, config)?;
        ledger.checkpoint()?;
        Ok(ledger)
    }

    /// Opens the ledger in `dir`: replays the log, checks every stored byte, truncates a torn
    /// tail, and starts the committer.
    pub fn open(dir: &Path, config: Config) -> Result<(Ledger, OpenReport)> {
        let meta = Meta::read(dir)?;
        let guard = lock(dir)?;
        let verifier = VerifierKey::parse(&meta.verifier_key)?;
        let signer = keyfile::read_private_key(&dir.join(KEY_FILE))?;
        if signer.verifier() != verifier {
            return Err(Error::Invalid(
                "ledger.key does not match the ledger's verifier key".into(),
            ));
        }
        let mut report = OpenReport::default();

        // The log: scan, cut a torn tail.
        let log = storage::open_append(&dir.join(LOG_FILE))?;
        let map = storage::map_readonly(&log)?;
        let data: &[u8] = map.as_deref().unwrap_or(&[]);
        let scan = storage::scan_log(data)?;
        if scan.torn_bytes > 0 {
            tracing::warn!(
                bytes = scan.torn_bytes,
                entries = scan.records.len(),
                "truncating a torn tail left by a crash"
            );
            report.truncated_bytes = scan.torn_bytes;
        }

        // Checkpoints: signature-checked here, compared with the tree during replay.
        let (cps, cp_end, cp_len) = load_checkpoints(dir, &verifier, &meta.origin)?;
        let checkpoints: Vec<Checkpoint> = cps.iter().map(|(_, c)| c.clone()).collect();
        report.checkpoints = cps.len();
        meta.check_reached(scan.records.len() as u64, cps.len() as u64)?;

        let mut tree = TreeFile::open(&dir.join(TREE_FILE))?;
        let no_progress = |_: u64, _: u64| {};
        let opts = ReplayOptions {
            strict: false,
            signatures: false,
            ledger_key: &verifier,
            checkpoints: &checkpoints,
            progress: &no_progress,
        };
        let (state, stats) = replay(data, &scan.records, TreeMode::Repair(&mut tree), &opts)?;
        if scan.records.is_empty() {
            return Err(Error::Corrupt {
                index: 0,
                file: LOG_FILE,
                reason: "the log has no genesis entry".into(),
            });
        }
        report.entries = scan.records.len() as u64;
        report.nodes_repaired = stats.nodes_repaired;
        drop(map);
        if scan.torn_bytes > 0 {
            log.set_len(scan.end)?;
            log.sync_all()?;
        }
        if cp_end < cp_len {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(CHECKPOINT_FILE))?;
            f.set_len(cp_end)?;
            f.sync_all()?;
        }
        if stats.nodes_repaired > 0 {
            tree.flush()?;
        }
        let latest = cps.last().map(|(n, _)| n.clone()).unwrap_or_default();
        let size = scan.records.len() as u64;
        let stored_checkpoints = cps.len() as u64;
        let shared = Arc::new(Shared {
            origin: meta.origin.clone(),
            dir: dir.to_owned(),
            meta: Mutex::new(meta),
            stored_checkpoints: AtomicU64::new(stored_checkpoints),
            signer,
            verifier,
            log_read: File::open(dir.join(LOG_FILE))?,
            offsets: RwLock::new(scan.records),
            tree: RwLock::new(tree),
            size: AtomicU64::new(size),
            applied: AtomicU64::new(size),
            state: RwLock::new(state),
            checkpoint: RwLock::new(latest),
            poisoned: AtomicBool::new(false),
            config,
        });
        let (tx, rx) = mpsc::sync_channel(shared.config.max_batch.max(1) * 2);
        let cp_file = storage::open_append(&dir.join(CHECKPOINT_FILE))?;
        let worker = Arc::clone(&shared);
        let committer = std::thread::Builder::new()
            .name("ledger-commit".into())
            .spawn(move || commit_loop(&worker, rx, log, cp_file))?;
        Ok((
            Ledger {
                shared,
                tx: Some(tx),
                committer: Some(committer),
                dir: dir.to_path_buf(),
                _lock: guard,
            },
            report,
        ))
    }

    /// The directory holding the ledger.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The origin line of checkpoints.
    pub fn origin(&self) -> &str {
        &self.shared.origin
    }

    /// The ledger's verifier key (checkpoints and operator entries).
    pub fn verifier_key(&self) -> &VerifierKey {
        &self.shared.verifier
    }

    /// A 32-byte key for `context` derived from the ledger's signing key (for example the key
    /// that authenticates stored study secrets).
    pub fn derived_key(&self, context: &str) -> zeroize::Zeroizing<[u8; 32]> {
        self.shared.signer.derive(context)
    }

    /// The operator principal the ledger's key belongs to.
    pub fn operator(&self) -> PrincipalId {
        PrincipalId::new(self.shared.signer.name()).expect("the key name was a valid id at init")
    }

    /// Number of durable entries.
    pub fn size(&self) -> u64 {
        self.shared.size.load(Ordering::Acquire)
    }

    /// Read access to the derived state.
    pub fn state(&self) -> RwLockReadGuard<'_, State> {
        read_lock(&self.shared.state)
    }

    /// Whether a storage failure stopped appends.
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    /// Appends an entry signed by its author. Returns once it is durable. On any refusal
    /// nothing is written.
    pub fn append(&self, signed: SignedEntry) -> Result<Appended> {
        let reply = self.enqueue_signed(signed)?;
        reply.recv().map_err(|_| Error::Poisoned)?
    }

    /// Appends entries signed by their authors, in their order, made durable together (the
    /// committer writes them in as few batches as it can, each with one fsync). Each entry is
    /// checked and applied on its own, as by [`Ledger::append`]: a refused one writes nothing
    /// and the others go on. Returns, once every accepted entry is durable, one result per
    /// entry.
    pub fn append_many(&self, signed: Vec<SignedEntry>) -> Vec<Result<Appended>> {
        let replies: Vec<_> = signed.into_iter().map(|s| self.enqueue_signed(s)).collect();
        replies
            .into_iter()
            .map(|r| r.and_then(|rx| rx.recv().map_err(|_| Error::Poisoned)?))
            .collect()
    }

    /// Checks an author-signed entry (clock, key, signature) and hands it to the committer;
    /// the receiver gets the outcome once it is durable or refused.
    fn enqueue_signed(&self, signed: SignedEntry) -> Result<Reply> {
        let canonical = signed.entry.canonical_bytes();
        let skew = signed.entry.time.unix() - Timestamp::now().unix();
        let max = self.shared.config.max_clock_skew.as_secs() as i64;
        if skew.abs() > max {
            return Err(Error::ClockSkew {
                skew_secs: skew,
                max_secs: max,
            });
        }
        // The key is looked up under the state lock; the signature (the costly part) is
        // checked outside it, so the committer is never kept waiting.
        let (key, key_since) = read_lock(&self.shared.state).signing_key(&signed.entry)?;
        if !key.verify_raw(&canonical, &signed.sig) {
            return Err(Error::BadSignature {
                author: signed.entry.author.to_string(),
            });
        }
        self.enqueue(
            signed.entry,
            leaf_from_parts(&canonical, &signed.sig),
            key_since,
        )
    }

    /// Signs `body` with the ledger's own (operator) key and appends it. The ledger's own
    /// signature is not re-verified here (`verify` checks it like every other).
    pub fn append_as_operator(&self, body: Body) -> Result<Appended> {
        let entry = Entry {
            author: self.operator(),
            time: Timestamp::now(),
            body,
        };
        let canonical = entry.canonical_bytes();
        let sig = self.shared.signer.sign_raw(&canonical);
        let (key, key_since) = read_lock(&self.shared.state).signing_key(&entry)?;
        if key != self.shared.verifier {
            return Err(Error::Invalid(
                "the operator's registered key is not the ledger key".into(),
            ));
        }
        self.submit(entry, leaf_from_parts(&canonical, &sig), key_since)
    }

    fn submit(&self, entry: Entry, leaf: Vec<u8>, key_since: u64) -> Result<Appended> {
        let rx = self.enqueue(entry, leaf, key_since)?;
        rx.recv().map_err(|_| Error::Poisoned)?
    }

    /// Hands an entry to the committer.
    fn enqueue(&self, entry: Entry, leaf: Vec<u8>, key_since: u64) -> Result<Reply> {
        if leaf.len() > MAX_RECORD {
            return Err(Error::Invalid(format!(
                "entry is larger than {MAX_RECORD} bytes"
            )));
        }
        let (reply, rx) = mpsc::sync_channel(1);
        let tx = self.tx.as_ref().ok_or(Error::Poisoned)?;
        tx.send(Request::Append(Box::new(Pending {
            entry,
            leaf,
            key_since,
            reply,
        })))
        .map_err(|_| Error::Poisoned)?;
        Ok(rx)
    }

    /// A signed checkpoint of the current tree, signing a new one if the tree grew since the
    /// latest.
    pub fn checkpoint(&self) -> Result<String> {
        let (reply, rx) = mpsc::sync_channel(1);
        let tx = self.tx.as_ref().ok_or(Error::Poisoned)?;
        tx.send(Request::Checkpoint(reply))
            .map_err(|_| Error::Poisoned)?;
        rx.recv().map_err(|_| Error::Poisoned)?
    }

    /// The latest stored checkpoint, without signing a new one.
    pub fn latest_checkpoint(&self) -> String {
        read_lock(&self.shared.checkpoint).clone()
    }

    fn check_size(&self, what: &'static str, value: u64, max: u64) -> Result<()> {
        if value > max {
            return Err(Error::OutOfRange {
                what,
                value,
                size: max,
            });
        }
        Ok(())
    }

    /// The exact leaf bytes of entry `index`. An entry the state already shows (its batch
    /// applied, its fsync under way) is waited for: whatever index a reader took from the
    /// state, it reads once durable, never an out-of-range error.
    pub fn leaf(&self, index: u64) -> Result<Vec<u8>> {
        let size = self.durable_past(index)?;
        if index >= size {
            return Err(Error::OutOfRange {
                what: "leaf index",
                value: index,
                size,
            });
        }
        let pos = read_lock(&self.shared.offsets)[index as usize];
        storage::read_record(&self.shared.log_read, pos)
    }

    /// The durable size, after waiting (briefly: one group commit) for entry `index` if the
    /// state already holds it.
    fn durable_past(&self, index: u64) -> Result<u64> {
        let mut size = self.size();
        if index < size || index >= self.shared.applied.load(Ordering::Acquire) {
            return Ok(size);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while index >= size && std::time::Instant::now() < deadline {
            if self.is_poisoned() {
                return Err(Error::Poisoned);
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
            size = self.size();
        }
        Ok(size)
    }

    /// The decoded entry `index`.
    pub fn entry(&self, index: u64) -> Result<SignedEntry> {
        Ok(SignedEntry::from_leaf(&self.leaf(index)?, false)?)
    }

    /// The RFC 9162 root at tree size `size` (at most the current size).
    pub fn root(&self, size: u64) -> Result<Hash> {
        self.check_size("tree size", size, self.size())?;
        Ok(merkle::root(&*read_lock(&self.shared.tree), size))
    }

    /// The leaf hash of entry `index`.
    pub fn leaf_hash(&self, index: u64) -> Result<Hash> {
        let size = self.size();
        if index >= size {
            return Err(Error::OutOfRange {
                what: "leaf index",
                value: index,
                size,
            });
        }
        Ok(merkle::NodeSource::node(
            &*read_lock(&self.shared.tree),
            0,
            index,
        ))
    }

    /// An inclusion proof of leaf `index` in the tree of size `size` (default: current).
    pub fn inclusion_proof(&self, index: u64, size: Option<u64>) -> Result<Vec<Hash>> {
        let size = size.unwrap_or_else(|| self.size());
        self.check_size("tree size", size, self.size())?;
        if index >= size {
            return Err(Error::OutOfRange {
                what: "leaf index",
                value: index,
                size,
            });
        }
        Ok(merkle::inclusion_proof(
            &*read_lock(&self.shared.tree),
            index,
            size,
        )?)
    }

    /// A consistency proof from size `old` to size `new` (default: current).
    pub fn consistency_proof(&self, old: u64, new: Option<u64>) -> Result<Vec<Hash>> {
        let new = new.unwrap_or_else(|| self.size());
        self.check_size("tree size", new, self.size())?;
        self.check_size("old tree size", old, new)?;
        if old == 0 {
            return Err(Error::Invalid(
                "a consistency proof needs an old size of at least 1".into(),
            ));
        }
        Ok(merkle::consistency_proof(
            &*read_lock(&self.shared.tree),
            old,
            new,
        )?)
    }

    /// Stops the committer after it finishes queued appends, and signs a last checkpoint.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if self.tx.is_some() && !self.is_poisoned() {
            self.checkpoint()?;
        }
        self.tx = None;
        if let Some(h) = self.committer.take() {
            h.join().map_err(|_| Error::Poisoned)?;
        }
        read_lock(&self.shared.tree).flush()
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "ledger did not close cleanly");
        }
    }
}

fn commit_loop(shared: &Shared, rx: Receiver<Request>, mut log: File, mut cp_file: File) {
    let mut last_cp = Instant::now();
    while let Ok(first) = rx.recv() {
        let mut appends = Vec::new();
        let mut cp_waiters = Vec::new();
        let mut next = Some(first);
        while let Some(req) = next.take() {
            match req {
                Request::Append(p) => appends.push(*p),
                Request::Checkpoint(w) => cp_waiters.push(w),
            }
            if appends.len() < shared.config.max_batch {
                next = rx.try_recv().ok();
            }
        }
        if !appends.is_empty() {
            commit_batch(shared, &mut log, appends);
        }
        let due = last_cp.elapsed() >= shared.config.checkpoint_interval;
        if !cp_waiters.is_empty() || due {
            let result = issue_checkpoint(shared, &mut cp_file);
            if result.is_ok() {
                last_cp = Instant::now();
            }
            for w in cp_waiters {
                let r = match &result {
                    Ok(s) => Ok(s.clone()),
                    Err(e) => Err(Error::Invalid(format!("checkpoint failed: {e}"))),
                };
                let _ = w.send(r);
            }
        }
    }
}

fn commit_batch(shared: &Shared, log: &mut File, appends: Vec<Pending>) {
    if shared.poisoned.load(Ordering::Acquire) {
        for p in appends {
            let _ = p.reply.send(Err(Error::Poisoned));
        }
        return;
    }
    let mut buf = Vec::new();
    let mut accepted = Vec::with_capacity(appends.len());
    let base_offset = read_lock(&shared.offsets)
        .last()
        .map(|r| r.offset + 20 + r.len as u64)
        .unwrap_or(0);
    let mut write_error = None;
    {
        let mut state = write_lock(&shared.state);
        let mut tree = write_lock(&shared.tree);
        for p in appends {
            let index = state.size();
            let tree_ref = &*tree;
            let root_at = |size: u64| (size <= index).then(|| merkle::root(tree_ref, size));
            match state.apply(p.entry, index, p.key_since, &root_at) {
                Err(e) => {
                    let _ = p.reply.send(Err(e));
                }
                Ok(()) => {
                    let offset = base_offset + buf.len() as u64;
                    storage::encode_record(&mut buf, index, &p.leaf);
                    let leaf_hash = merkle::leaf_hash(&p.leaf);
                    if let Err(e) = tree.push_leaf(index, &leaf_hash) {
                        write_error = Some(e);
                    }
                    accepted.push((
                        p.reply,
                        index,
                        leaf_hash,
                        RecordPos {
                            offset,
                            len: p.leaf.len() as u32,
                        },
                    ));
                }
            }
        }
        shared.applied.store(state.size(), Ordering::Release);
    }
    if accepted.is_empty() {
        return;
    }
    let result = match write_error {
        Some(e) => Err(e),
        None => storage::append_durable(log, &buf),
    };
    if let Err(e) = result {
        // The state already holds entries that are not durable: stop accepting appends.
        tracing::error!(error = %e, "ledger write failed; appends stop until the ledger is reopened");
        shared.poisoned.store(true, Ordering::Release);
        for (reply, ..) in accepted {
            let _ = reply.send(Err(Error::Poisoned));
        }
        return;
    }
    {
        let mut offsets = write_lock(&shared.offsets);
        offsets.extend(accepted.iter().map(|a| a.3));
        shared.size.store(offsets.len() as u64, Ordering::Release);
    }
    for (reply, index, leaf_hash, _) in accepted {
        let _ = reply.send(Ok(Appended { index, leaf_hash }));
    }
}

fn issue_checkpoint(shared: &Shared, cp_file: &mut File) -> Result<String> {
    let size = shared.size.load(Ordering::Acquire);
    {
        let latest = read_lock(&shared.checkpoint);
        if !latest.is_empty()
            && note::open_checkpoint(&shared.verifier, &latest, None).is_ok_and(|c| c.size == size)
        {
            return Ok(latest.clone());
        }
    }
    let root = {
        let tree = read_lock(&shared.tree);
        // Node hashes covered by a checkpoint are flushed with it.
        tree.flush()?;
        merkle::root(&*tree, size)
    };
    let cp = Checkpoint {
        origin: shared.origin.clone(),
        size,
        root,
        extensions: Vec::new(),
    };
    let signed = note::sign_checkpoint(&shared.signer, &cp)?;
    storage::append_durable(cp_file, &storage::encode_checkpoint(&signed))?;
    let stored = shared.stored_checkpoints.fetch_add(1, Ordering::AcqRel) + 1;
    // How far the ledger got, recorded after the checkpoint is durable (a crash in between
    // leaves a record that is behind, never ahead).
    {
        let mut meta = shared.meta.lock().unwrap_or_else(|p| p.into_inner());
        meta.reached = Some(Reached {
            size,
            checkpoints: stored,
        });
        meta.write(&shared.dir)?;
    }
    *write_lock(&shared.checkpoint) = signed.clone();
    Ok(signed)
}

/// What [`verify`] checked.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Entries checked.
    pub entries: u64,
    /// Checkpoints checked.
    pub checkpoints: usize,
    /// The tree root at the last entry, base64.
    pub root: String,
}

/// Full verification of the ledger in `dir`, without opening it for writes and without
/// changing any file: every record's framing and checksums, canonical encoding, every author
/// signature, every stored node hash and every checkpoint. Fails naming the first bad entry.
pub fn verify(dir: &Path, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<VerifyReport> {
    verify_state(dir, progress).map(|(report, _)| report)
}

/// [`verify`], also returning the state the verified log derives (read-only: for checks of
/// what else a data directory stores against the ledger, with no ledger opened).
pub fn verify_state(
    dir: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(VerifyReport, State)> {
    use base64::Engine as _;
    let meta = Meta::read(dir)?;
    let verifier = VerifierKey::parse(&meta.verifier_key)?;
    let log = File::open(dir.join(LOG_FILE))?;
    let map = storage::map_readonly(&log)?;
    let data: &[u8] = map.as_deref().unwrap_or(&[]);
    let scan = storage::scan_log(data)?;
    if scan.torn_bytes > 0 {
        return Err(Error::Corrupt {
            index: scan.records.len() as u64,
            file: LOG_FILE,
            reason: format!(
                "{} bytes of a torn tail (opening the ledger truncates them)",
                scan.torn_bytes
            ),
        });
    }
    let (cps, _, _) = load_checkpoints(dir, &verifier, &meta.origin)?;
    meta.check_reached(scan.records.len() as u64, cps.len() as u64)?;
    let checkpoints: Vec<Checkpoint> = cps.into_iter().map(|(_, c)| c).collect();
    let tree_path = dir.join(TREE_FILE);
    if !tree_path.exists() {
        return Err(Error::Corrupt {
            index: 0,
            file: TREE_FILE,
            reason: "the node hash file is missing".into(),
        });
    }
    let tree = TreeFile::open_readonly(&tree_path)?;
    let opts = ReplayOptions {
        strict: true,
        signatures: true,
        ledger_key: &verifier,
        checkpoints: &checkpoints,
        progress,
    };
    let (state, _) = replay(data, &scan.records, TreeMode::Check(&tree), &opts)?;
    let report = VerifyReport {
        entries: state.size(),
        checkpoints: checkpoints.len(),
        root: base64::engine::general_purpose::STANDARD.encode(merkle::root(&tree, state.size())),
    };
    Ok((report, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_the_state_shows_is_read_once_durable() {
        // The state holds a batch before its fsync ends: an index taken from it is waited
        // for, not refused (it once failed "leaf index N out of range (tree size N)").
        let dir = tempfile::tempdir().expect("a temporary directory");
        let op = PrincipalId::new("operator").expect("an id");
        let l = Ledger::init(dir.path(), "test/ledger", &op, Config::default()).expect("init");
        let last = l.size() - 1;
        // The batch of `last` as a reader may see it: applied, not yet durable.
        l.shared.size.store(last, Ordering::Release);
        let shared = Arc::clone(&l.shared);
        let fsync = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            shared.size.store(last + 1, Ordering::Release);
        });
        let read = l.entry(last);
        fsync.join().expect("the fsync stand-in");
        assert!(read.is_ok(), "{read:?}");
        // Past what the state holds, a read is refused at once.
        assert!(matches!(l.entry(last + 1), Err(Error::OutOfRange { .. })));
    }
}
