//! The fault harness: the real `broker` binary serving the demo, under concurrent gRPC clients
//! (queries, consents, audit reads), killed with SIGKILL at random moments and started again.
//! After every kill the broker must start on what the disk holds; at the end every answer,
//! consent and receipt that was acknowledged is on the ledger, the budget spent is the sum of
//! the receipts, and `broker check` finds every stored byte accounted for.
//!
//! CI runs a small size. A benchmark-sized run (the numbers in the reliability notes):
//!
//! ```text
//! CONSENTRY_FAULT_CYCLES=32 CONSENTRY_FAULT_CLIENTS=24 \
//!   cargo test --workspace --locked --test faults -- --nocapture
//! ```
//!
//! The soak benchmark (ignored by default; bounded, loopback only) runs the same load without
//! kills for a while and reports throughput, latency percentiles, resident memory and open
//! files of the broker process:
//!
//! ```text
//! CONSENTRY_SOAK_SECS=600 CONSENTRY_SOAK_CLIENTS=32 \
//!   CONSENTRY_SOAK_BROKER=path/to/release/broker \
//!   cargo test --workspace --locked --test faults soak -- --ignored --nocapture
//! ```
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker::client::{self, Bearer};
use ledger::entry::{Body, Outcome};
use ledger::note::SignerKey;
use proto::v1;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const STUDY: &str = "t2d-outcomes";
const DATASET: &str = "ehr";
/// The demo's grant to the study.
const GRANTED_EPSILON: f64 = 10.0;
/// Each query's epsilon (and a little more per query, so that no two are identical repeats).
const EPSILON: f64 = 0.001;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A `broker demo` process serving a data directory.
struct Served {
    child: Child,
    url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    /// Starts (or restarts) the demo broker on `dir` and waits until it serves.
    fn start(binary: &Path, dir: &Path) -> Served {
        let mut child = Command::new(binary)
            .args(["demo", "--listen", "127.0.0.1:0", "--patients", "200"])
            .args(["--seed", "9"])
            .env("CONSENTRY_DATA_DIR", dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the broker's stderr to its end, so that the broker never blocks on it.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("serving on ") {
                    if let Some(tx) = tx.take() {
                        let addr = addr.split_whitespace().next().unwrap_or("").to_owned();
                        let _ = tx.send(Ok(addr));
                    }
                } else if let Some(tx) = &tx {
                    let _ = tx.send(Err(line));
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut said = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Ok(addr)) => {
                    return Served {
                        child,
                        url: format!("http://{addr}"),
                    };
                }
                Ok(Err(line)) => said.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("the broker exited before serving:\n{}", said.join("\n"))
                }
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not serve:\n{}",
                said.join("\n")
            );
        }
    }

    /// SIGKILL: no shutdown, no flush.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// The broker's resident memory (kB), the anonymous part of it (kB: what the process
    /// allocated, without its code pages), and its open file descriptors.
    fn usage(&self) -> (u64, u64, usize) {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kb = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
        (kb("VmRSS:"), kb("RssAnon:"), fds)
    }
}

fn key(dir: &Path, name: &str) -> SignerKey {
    ledger::keyfile::read_private_key(&dir.join("keys").join(format!("{name}.key"))).unwrap()
}

type Auth = InterceptedService<Channel, Bearer>;

fn channel(url: &str, k: SignerKey) -> Auth {
    let ch = Channel::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    InterceptedService::new(ch, Bearer::new(k))
}

/// What the broker acknowledged, and what went wrong while it was up.
#[derive(Default)]
struct Log {
    /// (receipt index, normalized SQL) of every answered query.
    answered: Vec<(u64, String)>,
    /// (entry index, consent id) of every acknowledged consent.
    consents: Vec<(u64, String)>,
    /// Audit reads that succeeded.
    audits: u64,
    /// Latencies of successful calls.
    latencies: Vec<Duration>,
    /// Errors that arrived while the broker was up (before its kill), other than budget
    /// refusals: (when, what).
    errors: Vec<(Instant, String)>,
}

/// One client: a mix of DP queries (alice), consents (the hospital) and audit reads (the IRB),
/// until `stop`.
async fn client(
    url: String,
    dir: PathBuf,
    id: usize,
    cycle: usize,
    stop: Instant,
    log: Arc<Mutex<Log>>,
) {
    let mut query = v1::query_client::QueryClient::new(channel(&url, key(&dir, "alice")));
    let mut consent = v1::consent_client::ConsentClient::new(channel(&url, key(&dir, "hospital")));
    let mut audit = v1::audit_client::AuditClient::new(channel(&url, key(&dir, "irb")));
    let hospital = key(&dir, "hospital");
    let mut n = 0u64;
    let mut last_receipt = 0u64;
    while Instant::now() < stop {
        n += 1;
        let started = Instant::now();
        let outcome: Result<(), tonic::Status> = match (n + id as u64) % 4 {
            0 | 1 => {
                // Distinct epsilons: no query is an identical repeat of another.
                let tag = (cycle * 1_000_003 + id * 10_007) as f64 + n as f64;
                let req = v1::QueryRequest {
                    study: STUDY.into(),
                    dataset: DATASET.into(),
                    sql: "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex".into(),
                    epsilon: EPSILON + tag * 1e-12,
                    ..Default::default()
                };
                match query.run(req).await {
                    Ok(stream) => match client::collect_query(stream.into_inner()).await {
                        Ok((header, _)) => {
                            last_receipt = last_receipt.max(header.receipt_index);
                            log.lock()
                                .unwrap()
                                .answered
                                .push((header.receipt_index, header.normalized_sql));
                            Ok(())
                        }
                        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
                    },
                    Err(s) => Err(s),
                }
            }
            2 => {
                let consent_id = format!("fault-{cycle}-{id}-{n}");
                let json = serde_json::json!({
                    "consent_id": consent_id,
                    "subject": format!("fault-subject-{cycle}-{id}-{n}"),
                    "scope": {"custodian": "hospital"},
                    "purposes": ["GRU"],
                    "valid_from": "2024-01-01T00:00:00Z",
                    "grantor": "hospital",
                });
                let body = Body::from_json("consent_granted", &json.to_string()).unwrap();
                let signed = client::sign(&hospital, body).unwrap();
                match consent.grant(signed).await {
                    Ok(r) => {
                        log.lock()
                            .unwrap()
                            .consents
                            .push((r.into_inner().index, consent_id));
                        Ok(())
                    }
                    Err(s) => Err(s),
                }
            }
            // The IRB reads the log where it is being written (a page: at most 1,000).
            _ => match audit
                .receipts(v1::AuditRequest {
                    study: STUDY.into(),
                    after_index: last_receipt.saturating_sub(2_000),
                    ..Default::default()
                })
                .await
            {
                Ok(_) => {
                    log.lock().unwrap().audits += 1;
                    Ok(())
                }
                Err(s) => Err(s),
            },
        };
        let mut log = log.lock().unwrap();
        match outcome {
            Ok(()) => log.latencies.push(started.elapsed()),
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {}
            Err(s) => log
                .errors
                .push((Instant::now(), format!("{:?}: {}", s.code(), s.message()))),
        }
    }
}

/// Runs `clients` clients against `url` for `run`, then stops them.
async fn load(url: &str, dir: &Path, clients: usize, cycle: usize, run: Duration) -> Log {
    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Instant::now() + run;
    let tasks: Vec<_> = (0..clients)
        .map(|id| {
            tokio::spawn(client(
                url.to_owned(),
                dir.to_owned(),
                id,
                cycle,
                stop,
                log.clone(),
            ))
        })
        .collect();
    for t in tasks {
        // A client still waiting on a killed broker is cut off.
        let _ = tokio::time::timeout(run + Duration::from_secs(30), t).await;
    }
    std::mem::take(&mut *log.lock().unwrap())
}

/// A small deterministic generator (the harness's moments of the kills).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[test]
fn sigkill_under_concurrent_clients_loses_nothing_acknowledged() {
    let cycles = env_or("CONSENTRY_FAULT_CYCLES", 3) as usize;
    let clients = env_or("CONSENTRY_FAULT_CLIENTS", 8) as usize;
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_broker"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let mut rng = Lcg(env_or("CONSENTRY_FAULT_SEED", 7));
    let mut all = Log::default();
    for cycle in 0..cycles {
        let served = Served::start(&binary, &dir);
        let url = served.url.clone();
        let dir2 = dir.clone();
        // The clients run past the kill: the kill lands while calls are in flight.
        let kill_after = Duration::from_millis(1500 + rng.below(2500));
        let run = kill_after + Duration::from_millis(500);
        let clients_done = std::thread::spawn(move || {
            rt_block(move |rt| rt.block_on(load(&url, &dir2, clients, cycle, run)))
        });
        std::thread::sleep(kill_after);
        let killed_at = Instant::now();
        served.kill();
        let log = clients_done.join().unwrap();
        let up_errors: Vec<_> = log.errors.iter().filter(|(t, _)| *t < killed_at).collect();
        assert!(
            up_errors.is_empty(),
            "cycle {cycle}: calls failed while the broker was up: {up_errors:?}"
        );
        eprintln!(
            "cycle {cycle}: killed after {kill_after:?}; {} answers, {} consents, {} audits \
             acknowledged",
            log.answered.len(),
            log.consents.len(),
            log.audits
        );
        all.answered.extend(log.answered);
        all.consents.extend(log.consents);
        all.audits += log.audits;
    }
    assert!(
        !all.answered.is_empty() && !all.consents.is_empty() && all.audits > 0,
        "the load did nothing: {} answers, {} consents, {} audits",
        all.answered.len(),
        all.consents.len(),
        all.audits
    );

    // Every stored byte accounted for, by the operator's own check.
    let check = Command::new(&binary)
        .args(["check", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // Ground truth: the ledger as the disk holds it.
    let (ledger, _) =
        ledger::Ledger::open(&dir.join("ledger"), ledger::ledger::Config::default()).unwrap();
    for (index, sql) in &all.answered {
        let entry = ledger.entry(*index).unwrap().entry;
        let Body::QueryReceipt(r) = entry.body else {
            panic!("entry {index}, acknowledged as a query's receipt, is not one");
        };
        assert_eq!(r.outcome, Outcome::Released, "entry {index}");
        assert_eq!(&r.sql, sql, "entry {index}");
    }
    for (index, id) in &all.consents {
        let entry = ledger.entry(*index).unwrap().entry;
        let Body::ConsentGranted(c) = entry.body else {
            panic!("entry {index}, acknowledged as a consent, is not one");
        };
        assert_eq!(&c.consent_id, id, "entry {index}");
    }
    // The budget spent is the sum of the receipts, within the grant.
    let receipts: f64 = (0..ledger.size())
        .filter_map(|i| match ledger.entry(i).unwrap().entry.body {
            Body::QueryReceipt(r) if r.study == STUDY => Some(r.epsilon),
            _ => None,
        })
        .sum();
    let spent = ledger.state().spent(STUDY, DATASET);
    assert!(
        (spent.epsilon - receipts).abs() < 1e-9,
        "spent {} but the receipts sum to {receipts}",
        spent.epsilon
    );
    assert!(spent.epsilon <= GRANTED_EPSILON + 1e-12);
}

/// Runs `f` on a runtime of its own (the clients' threads).
fn rt_block<T>(f: impl FnOnce(&tokio::runtime::Runtime) -> T) -> T {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    f(&rt)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

#[test]
#[ignore = "a benchmark: run with --ignored (see the module's documentation)"]
fn soak() {
    let secs = env_or("CONSENTRY_SOAK_SECS", 60);
    let clients = env_or("CONSENTRY_SOAK_CLIENTS", 32) as usize;
    let binary = std::env::var_os("CONSENTRY_SOAK_BROKER").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_broker")),
        PathBuf::from,
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let served = Served::start(&binary, &dir);
    let (rss0, anon0, fds0) = served.usage();
    let url = served.url.clone();
    let mut rounds = Vec::new();
    // Ten rounds, so that memory and descriptors are seen over time.
    let round = Duration::from_secs(secs.div_ceil(10).max(1));
    let mut all = Log::default();
    for r in 0..10 {
        let started = Instant::now();
        let log = rt_block(|rt| rt.block_on(load(&url, &dir, clients, r, round)));
        let (rss, anon, fds) = served.usage();
        let calls = log.latencies.len();
        eprintln!(
            "round {r}: {calls} calls in {:?}; broker RSS {} MiB (anonymous {} MiB), {fds} \
             descriptors",
            started.elapsed(),
            rss / 1024,
            anon / 1024
        );
        rounds.push((rss, anon, fds));
        all.latencies.extend(log.latencies);
        all.errors.extend(log.errors);
        all.answered.extend(log.answered);
        all.consents.extend(log.consents);
        all.audits += log.audits;
    }
    let mut lat = all.latencies.clone();
    lat.sort_unstable();
    let total = round * 10;
    eprintln!(
        "soak: {clients} clients, {:?}; {} calls ({:.0}/s): {} answers, {} consents, {} audits; \
         p50 {:?}, p99 {:?}, max {:?}; RSS {} -> {} MiB (anonymous {} -> {} MiB), \
         descriptors {fds0} -> {}; {} errors",
        total,
        lat.len(),
        lat.len() as f64 / total.as_secs_f64(),
        all.answered.len(),
        all.consents.len(),
        all.audits,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or_default(),
        rss0 / 1024,
        rounds.last().map_or(0, |r| r.0) / 1024,
        anon0 / 1024,
        rounds.last().map_or(0, |r| r.1) / 1024,
        rounds.last().map_or(0, |r| r.2),
        all.errors.len()
    );
    assert!(
        all.errors.is_empty(),
        "{:?}",
        &all.errors[..all.errors.len().min(10)]
    );
    drop(served);
}
