//! Fixtures shared by the ledger benchmarks: a fixed cast of principals, realistic consents
//! and query receipts, and the cached on-disk data sets (a 1M-entry ledger and a 10M-leaf
//! node-hash file).
//!
//! Everything is written under `$LEDGER_BENCH_DIR` (default: `<workspace>/target/bench-data`).
//! Point it at a real disk, not a tmpfs: durable appends and replays are the point.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ledger::duo::{Modifier, Purpose};
use ledger::entry::*;
use ledger::ids::*;
use ledger::merkle;
use ledger::note::SignerKey;
use ledger::storage::TreeFile;
use ledger::{Config, Ledger, State};

/// Bump when the generated data changes, so stale caches are rebuilt.
pub const FORMAT: u32 = 1;
pub const ORIGIN: &str = "bench.consentry/ledger";
pub const DATASET: &str = "ehr";
pub const STUDY: &str = "t2d";

/// Entries in the cached big ledger, setup included.
pub const BIG_ENTRIES: u64 = 1_000_000;
/// Entries appended by the cast before any workload entry.
pub const SETUP_ENTRIES: u64 = 8;
/// Workload jobs of the big ledger: job `j` is a query receipt if `j % 10 == 9`, else the
/// consent of subject `j`.
pub const BIG_JOBS: u64 = BIG_ENTRIES - SETUP_ENTRIES;

/// Where cached bench data lives.
pub fn bench_root() -> PathBuf {
    let root = std::env::var_os("LEDGER_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-data"));
    std::fs::create_dir_all(&root).unwrap();
    root
}

/// A fresh temporary directory on the bench disk.
pub fn fresh_dir() -> tempfile::TempDir {
    let tmp = bench_root().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    tempfile::tempdir_in(tmp).unwrap()
}

/// A principal with a deterministic key.
pub struct Actor {
    pub id: PrincipalId,
    pub key: SignerKey,
}

impl Actor {
    pub fn new(id: &str) -> Actor {
        let seed = *Digest::of(format!("consentry-bench-seed/{id}").as_bytes()).bytes();
        Actor {
            id: PrincipalId::new(id).unwrap(),
            key: SignerKey::from_seed(id, seed).unwrap(),
        }
    }

    pub fn entry(&self, body: Body) -> Entry {
        Entry {
            author: self.id.clone(),
            time: Timestamp::now(),
            body,
        }
    }

    pub fn sign(&self, body: Body) -> SignedEntry {
        SignedEntry::sign(&self.key, self.entry(body))
    }

    fn registration(&self, role: Role) -> Body {
        Body::PrincipalRegistered(PrincipalRegistered {
            id: self.id.clone(),
            role,
            key: self.key.verifier().to_text(),
            subject: None,
            display_name: Some(format!("{} (bench)", self.id)),
        })
    }
}

/// The principals of every bench ledger, and the dataset version receipts name.
pub struct Cast {
    pub custodian: Actor,
    pub irb: Actor,
    pub researcher: Actor,
    pub sponsor: Actor,
    pub dataset_digest: Digest,
}

fn ts(s: &str) -> Timestamp {
    Timestamp::parse(s).unwrap()
}

fn dataset_tables() -> Vec<TableManifest> {
    let col = |name: &str, ty: &str, nullable| ColumnManifest {
        name: name.into(),
        data_type: ty.into(),
        nullable,
    };
    ["visits", "labs", "diagnoses"]
        .iter()
        .map(|t| TableManifest {
            name: (*t).into(),
            rows: 4_000_000,
            columns: vec![
                col("patient_id", "Utf8", false),
                col("visit_date", "Date32", false),
                col("age", "Int64", true),
                col("code", "Utf8", true),
            ],
            files: vec![FileManifest {
                path: format!("{t}/part-0.parquet"),
                bytes: 123_456_789,
                sha256: Digest::of(t.as_bytes()),
                rows: 4_000_000,
            }],
        })
        .collect()
}

impl Cast {
    pub fn new() -> Cast {
        Cast {
            custodian: Actor::new("st-mary"),
            irb: Actor::new("irb-boston"),
            researcher: Actor::new("dr-lee"),
            sponsor: Actor::new("acme-pharma"),
            dataset_digest: DatasetRegistered::compute_digest(&dataset_tables()),
        }
    }

    /// The entries after genesis that set up the bench world, with their authors: the cast's
    /// registrations, the opt-in dataset `ehr`, the study `t2d` (HMB, commercial) and its
    /// approval with a budget large enough for millions of receipts.
    pub fn setup_entries(&self) -> Vec<(Option<&Actor>, Body)> {
        let mut out: Vec<(Option<&Actor>, Body)> = vec![
            (None, self.custodian.registration(Role::Custodian)),
            (None, self.irb.registration(Role::Irb)),
            (None, self.researcher.registration(Role::Researcher)),
            (None, self.sponsor.registration(Role::Sponsor)),
        ];
        let tables = dataset_tables();
        out.push((
            Some(&self.custodian),
            Body::DatasetRegistered(DatasetRegistered {
                dataset: DatasetId::new(DATASET).unwrap(),
                version: 1,
                custodian: self.custodian.id.clone(),
                consent_basis: ConsentBasis::OptIn,
                privacy_unit: "patient_id".into(),
                policy_digest: Digest::of(b"policy"),
                digest: DatasetRegistered::compute_digest(&tables),
                tables,
            }),
        ));
        out.push((
            Some(&self.researcher),
            Body::StudyRegistered(StudyRegistered {
                study: StudyId::new(STUDY).unwrap(),
                title: "Type 2 diabetes outcomes".into(),
                sponsor: self.sponsor.id.clone(),
                pi: self.researcher.id.clone(),
                researchers: vec![self.researcher.id.clone()],
                purpose: Purpose::Hmb,
                commercial: true,
                methods_development: false,
                datasets: vec![DatasetId::new(DATASET).unwrap()],
            }),
        ));
        out.push((
            Some(&self.irb),
            Body::StudyApproved(StudyApproved {
                study: StudyId::new(STUDY).unwrap(),
                grants: vec![DatasetGrant {
                    dataset: DatasetId::new(DATASET).unwrap(),
                    epsilon: 1e12,
                    delta: 0.5,
                    dp: true,
                    extract_k: Some(5),
                    min_cell_size: None,
                }],
                valid_from: ts("2020-01-01T00:00:00Z"),
                valid_until: ts("2099-01-01T00:00:00Z"),
            }),
        ));
        out
    }

    /// Creates a ledger in `dir` with the bench world set up (8 entries).
    pub fn init_ledger(&self, dir: &Path, config: Config) -> Ledger {
        let ledger =
            Ledger::init(dir, ORIGIN, &PrincipalId::new("operator").unwrap(), config).unwrap();
        for (author, body) in self.setup_entries() {
            match author {
                None => ledger.append_as_operator(body).unwrap(),
                Some(a) => ledger.append(a.sign(body)).unwrap(),
            };
        }
        assert_eq!(ledger.size(), SETUP_ENTRIES);
        ledger
    }

    /// The same world as an in-memory [`State`] (no signatures: `State::apply` trusts its
    /// caller for those), for benches that need state without a log.
    pub fn setup_state(&self) -> State {
        let operator = Actor::new("operator");
        let mut state = State::default();
        let mut entries = vec![operator.entry(operator.registration(Role::Operator))];
        for (author, body) in self.setup_entries() {
            entries.push(author.unwrap_or(&operator).entry(body));
        }
        for (i, e) in entries.into_iter().enumerate() {
            let key_since = state
                .principal(e.author.as_str())
                .map_or(0, |p| p.key_since);
            state.apply(e, i as u64, key_since, &|_| None).unwrap();
        }
        state
    }
}

/// A cheap deterministic mix of `i` (splitmix64).
pub fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn uuid(i: u64) -> String {
    let (a, b) = (mix(i), mix(i ^ 0x5555_5555));
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

/// The consent of subject `i` on `ehr`, recorded by the custodian: mixed purposes (about
/// half admit the HMB commercial study), some with modifiers, FHIR ids or expiry dates.
pub fn consent_body(cast: &Cast, i: u64) -> Body {
    let r = mix(i);
    let p = |s: &str| Purpose::parse(s).unwrap();
    let (purposes, modifiers) = match r % 100 {
        0..35 => (vec![p("HMB")], vec![]),
        35..50 => (vec![p("GRU")], vec![Modifier::Irb]),
        50..58 => (vec![p("NRES")], vec![]),
        58..72 => (vec![p("DS:MONDO:0005148")], vec![]),
        72..80 => (vec![p("DS:MONDO:0004975"), p("POA")], vec![]),
        80..86 => (vec![p("POA")], vec![Modifier::Npu]),
        86..94 => (vec![p("HMB")], vec![Modifier::Ncu, Modifier::Irb]),
        _ => (vec![p("GRU"), p("HMB")], vec![Modifier::Nmds]),
    };
    let from = 1_577_836_800 + ((r >> 8) % (5 * 365)) as i64 * 86_400; // 2020-2024
    // One in twenty expires, at an hour between 2025 and 2037.
    let until = (r >> 20)
        .is_multiple_of(20)
        .then(|| Timestamp::from_unix(1_735_689_600 + ((r >> 24) % (12 * 8760)) as i64 * 3600))
        .transpose()
        .unwrap();
    Body::ConsentGranted(ConsentGranted {
        consent_id: uuid(i),
        subject: SubjectId::new(format!("MRN-{i:09}")).unwrap(),
        scope: ConsentScope {
            datasets: vec![DatasetId::new(DATASET).unwrap()],
            custodian: None,
        },
        purposes,
        modifiers,
        studies_allow: vec![],
        studies_deny: vec![],
        valid_from: Timestamp::from_unix(from).unwrap(),
        valid_until: until,
        grantor: cast.custodian.id.clone(),
        fhir_id: Some(format!("Consent/{}", uuid(!i))),
        replaces: None,
    })
}

/// Normalized SQL of about `len` bytes (at least ~250), varied by `i`.
pub fn sql_text(i: u64, len: usize) -> String {
    let r = mix(i);
    let mut sql = format!(
        "SELECT CASE WHEN v.age < 40 THEN '18-39' WHEN v.age < 65 THEN '40-64' ELSE '65+' END \
         AS age_band, COUNT(DISTINCT v.patient_id) AS patients, AVG(l.value) AS mean_hba1c \
         FROM visits v JOIN labs l ON l.patient_id = v.patient_id WHERE l.code = '4548-4' \
         AND v.visit_date >= DATE '{}-01-01' AND v.age BETWEEN {} AND {}",
        2015 + r % 6,
        18 + (r >> 8) % 20,
        60 + (r >> 16) % 30,
    );
    let clauses = [
        " AND l.value BETWEEN 3.0 AND 20.0",
        " AND v.patient_id IN (SELECT d.patient_id FROM diagnoses d WHERE d.code LIKE 'E11%')",
        " AND v.visit_type IN ('outpatient', 'inpatient', 'emergency')",
        " AND l.unit = '%' AND l.status = 'final'",
    ];
    let mut k = 0;
    while sql.len() + 36 < len {
        if k < clauses.len() as u64 {
            sql.push_str(clauses[k as usize]);
        } else {
            sql.push_str(&format!(" AND v.site_id <> {}", 100 + (mix(i + k) % 900)));
        }
        k += 1;
    }
    sql.push_str(" GROUP BY age_band ORDER BY age_band");
    sql
}

/// SQL length of the default receipts: their leaf is about 1 KB.
pub const RECEIPT_SQL: usize = 340;

/// A query receipt for `t2d` on `ehr` carrying about `sql_len` bytes of SQL: released
/// (spending a little epsilon) or, one in ten, denied (spending nothing).
pub fn receipt_body(cast: &Cast, i: u64, sql_len: usize) -> Body {
    let released = !mix(i ^ 0xabcdef).is_multiple_of(10);
    let mut mechanism = std::collections::BTreeMap::new();
    mechanism.insert("noise".to_string(), serde_json::json!("laplace"));
    mechanism.insert(
        "sensitivity".to_string(),
        serde_json::json!({"patients": 1, "mean_hba1c": 20.0}),
    );
    Body::QueryReceipt(QueryReceipt {
        study: STUDY.into(),
        researcher: cast.researcher.id.clone(),
        dataset: Some(DatasetId::new(DATASET).unwrap()),
        version: Some(1),
        dataset_digest: Some(cast.dataset_digest.clone()),
        sql: sql_text(i, sql_len),
        mode: QueryMode::Dp,
        mechanism,
        epsilon: if released { 0.001 } else { 0.0 },
        delta: 0.0,
        rho: None,
        consent_digest: Some(Digest::of(&i.to_le_bytes())),
        result_digest: released.then(|| Digest::of(&(!i).to_le_bytes())),
        outcome: if released {
            Outcome::Released
        } else {
            Outcome::Denied
        },
        reason: (!released).then(|| "the query's epsilon exceeds the per-query cap".into()),
        rows_suppressed: None,
    })
}

/// Runs `jobs` in order-insensitive parallel: `threads` workers take job numbers from a
/// shared counter. Prints progress every `every`.
pub fn parallel_jobs(jobs: u64, threads: usize, every: Duration, job: impl Fn(u64) + Sync) {
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let j = next.fetch_add(1, Ordering::Relaxed);
                    if j >= jobs {
                        break;
                    }
                    job(j);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let mut last = Instant::now();
        while done.load(Ordering::Relaxed) < jobs {
            std::thread::sleep(Duration::from_millis(100));
            if last.elapsed() >= every {
                last = Instant::now();
                let d = done.load(Ordering::Relaxed);
                let secs = start.elapsed().as_secs_f64();
                eprintln!(
                    "  {d}/{jobs} ({:.0}%) in {secs:.0} s, {:.0}/s",
                    100.0 * d as f64 / jobs as f64,
                    d as f64 / secs
                );
            }
        }
    });
}

/// The cached 1M-entry ledger (8 setup entries, 899,993 consents of distinct subjects on
/// `ehr`, 99,999 query receipts), built once with 64 appending threads.
pub fn big_ledger() -> PathBuf {
    let root = bench_root();
    let dir = root.join(format!("ledger-1m-v{FORMAT}"));
    let done = root.join(format!("ledger-1m-v{FORMAT}.complete"));
    if done.exists() {
        return dir;
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!(
        "building the {BIG_ENTRIES}-entry bench ledger in {} (once) ...",
        dir.display()
    );
    let cast = Cast::new();
    let start = Instant::now();
    let ledger = cast.init_ledger(&dir, Config::default());
    parallel_jobs(BIG_JOBS, 64, Duration::from_secs(10), |j| {
        if j % 10 == 9 {
            ledger
                .append_as_operator(receipt_body(&cast, j, RECEIPT_SQL))
                .unwrap();
        } else {
            ledger
                .append(cast.custodian.sign(consent_body(&cast, j)))
                .unwrap();
        }
    });
    assert_eq!(ledger.size(), BIG_ENTRIES);
    ledger.close().unwrap();
    let secs = start.elapsed().as_secs_f64();
    let log = std::fs::metadata(dir.join(ledger::storage::LOG_FILE))
        .unwrap()
        .len();
    let note = format!(
        "built {BIG_ENTRIES} entries in {secs:.1} s ({:.0} entries/s, 64 appenders); \
         entries.log {log} bytes\n",
        BIG_ENTRIES as f64 / secs
    );
    eprint!("  {note}");
    std::fs::write(&done, note).unwrap();
    dir
}

/// The synthetic leaf hash of leaf `i` in the big node-hash file.
pub fn synthetic_leaf(i: u64) -> merkle::Hash {
    merkle::leaf_hash(&i.to_le_bytes())
}

/// Leaves in the synthetic node-hash file.
pub const TREE_LEAVES: u64 = 10_000_000;

/// The cached node-hash file of 10M synthetic leaves, built with `TreeFile::push_leaf`, the
/// writer the ledger uses: the file `Ledger::inclusion_proof` reads. Its first 1M leaves are
/// exactly the tree of size 1M.
pub fn big_tree() -> PathBuf {
    let root = bench_root();
    let path = root.join(format!("tree-10m-v{FORMAT}.hashes"));
    let done = root.join(format!("tree-10m-v{FORMAT}.complete"));
    if done.exists() {
        return path;
    }
    let _ = std::fs::remove_file(&path);
    eprintln!("building the {TREE_LEAVES}-leaf node-hash file (once) ...");
    let start = Instant::now();
    let mut tree = TreeFile::open(&path).unwrap();
    for i in 0..TREE_LEAVES {
        tree.push_leaf(i, &synthetic_leaf(i)).unwrap();
    }
    tree.flush().unwrap();
    let note = format!(
        "built {TREE_LEAVES} leaves in {:.1} s\n",
        start.elapsed().as_secs_f64()
    );
    eprint!("  {note}");
    std::fs::write(&done, note).unwrap();
    path
}

/// `n` pseudo-random values in `lo..hi`.
pub fn spread(n: usize, lo: u64, hi: u64, salt: u64) -> Vec<u64> {
    (0..n as u64)
        .map(|k| lo + mix(k ^ (salt << 32)) % (hi - lo))
        .collect()
}
