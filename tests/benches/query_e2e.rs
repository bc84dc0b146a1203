//! End-to-end query benchmark: DP `COUNT(*)` through the gRPC broker (JWT auth, consent filter
//! from the ledger, OpenDP noise, receipt appended with fsync, Arrow IPC stream back) over a
//! dataset of `CONSENTRY_BENCH_ROWS` rows (default 1,000,000) with
//! `CONSENTRY_BENCH_ROWS_PER_PATIENT` rows per patient (default 1: a million subjects).
//!
//! Two registrations of the same file are compared side by side in one run:
//! - `optin`: opt-in, half of the patients consented (a consent filter over every row);
//! - `optout`: opt-out, nobody objected (no filter).
//!
//! With 1 client and with 32 concurrent clients it prints p50 and p99 latency and queries per
//! second, and the consent filter's overhead (optin / optout at p50). Each query asks a
//! slightly different epsilon, so none is served as a free repeat.
//!
//! The query is `SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex` (a scan in both cases;
//! a bare `COUNT(*)` over everyone is answered from the table's statistics without reading a
//! row, which would make any filter look expensive). `CONSENTRY_BENCH_SQL` sets another.
//!
//! Run: `cargo bench --workspace --bench query_e2e` (`CONSENTRY_BENCH_QUERIES` sets the
//! queries per measurement, default 200).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use broker::client::{self, Bearer};
use broker::server::{self, Broker, ServeOptions};
use ledger::entry::{Body, ConsentBasis, Entry, SignedEntry};
use ledger::ids::{PrincipalId, Timestamp};
use ledger::note::SignerKey;
use proto::v1;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const POLICY: &str = r#"
privacy_unit = "patient_id"
max_rows_per_unit = 8

[tables.visits.columns]
patient_id = { class = "privacy_unit" }
sex = { class = "public", domain = ["F", "M"] }
hba1c = { class = "sensitive", bounds = [4.0, 14.0] }
"#;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn signed(key: &SignerKey, kind: &str, json: serde_json::Value) -> anyhow::Result<SignedEntry> {
    let entry = Entry {
        author: PrincipalId::new(key.name())?,
        time: Timestamp::now(),
        body: Body::from_json(kind, &json.to_string())?,
    };
    Ok(SignedEntry::sign(key, entry))
}

fn write_data(path: &Path, rows: usize, patients: usize) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("patient_id", DataType::Int64, false),
        Field::new("sex", DataType::Utf8, false),
        Field::new("hba1c", DataType::Float64, false),
    ]));
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None)?;
    let chunk = 100_000;
    for start in (0..rows).step_by(chunk) {
        let end = (start + chunk).min(rows);
        let pid: Int64Array = (start..end).map(|r| (r % patients) as i64).collect();
        let sex: StringArray = (start..end)
            .map(|r| {
                Some(if (r % patients).is_multiple_of(2) {
                    "F"
                } else {
                    "M"
                })
            })
            .collect();
        let h: Float64Array = (start..end)
            .map(|r| 4.5 + (r * 7 % 90) as f64 / 10.0)
            .collect();
        w.write(&RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(pid), Arc::new(sex), Arc::new(h)],
        )?)?;
    }
    w.close()?;
    Ok(())
}

type Auth = InterceptedService<Channel, Bearer>;

fn auth(url: &str, key: &SignerKey) -> anyhow::Result<Auth> {
    let ch = Channel::from_shared(url.to_owned())?.connect_lazy();
    Ok(InterceptedService::new(
        ch,
        Bearer::new(SignerKey::parse(&key.to_text())?),
    ))
}

/// Latencies of `clients` concurrent clients running `per_client` queries each, and the wall
/// time of the whole measurement.
async fn measure(
    url: &str,
    key: &SignerKey,
    dataset: &str,
    clients: usize,
    per_client: usize,
    counter: &Arc<AtomicU64>,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let sql = std::env::var("CONSENTRY_BENCH_SQL")
        .unwrap_or_else(|_| "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex".into());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut q = v1::query_client::QueryClient::new(auth(url, key)?)
            .max_decoding_message_size(server::MAX_MESSAGE);
        let counter = counter.clone();
        let dataset = dataset.to_owned();
        let sql = sql.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let req = v1::QueryRequest {
                    study: "bench".into(),
                    dataset: dataset.clone(),
                    sql: sql.clone(),
                    mode: v1::Mode::Dp as i32,
                    epsilon: 0.01 + i as f64 * 1e-9,
                    ..Default::default()
                };
                let t = Instant::now();
                let stream = q.run(req).await?.into_inner();
                let (h, _) = client::collect_query(stream).await?;
                lat.push(t.elapsed());
                anyhow::ensure!(!h.repeated, "a query was served as a repeat");
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all, start.elapsed()))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

async fn run() -> anyhow::Result<()> {
    let rows = env("CONSENTRY_BENCH_ROWS", 1_000_000);
    let queries = env("CONSENTRY_BENCH_QUERIES", 200);
    let patients = rows / env("CONSENTRY_BENCH_ROWS_PER_PATIENT", 1).max(1);
    let dir = tempfile::tempdir()?;
    let args = broker::cli::serve::ServeArgs {
        data_dir: dir.path().to_owned(),
        listen: "127.0.0.1:0".parse()?,
        tls_cert: None,
        tls_key: None,
        origin: "bench.consentry/ledger".into(),
        operator: "operator".into(),
        limits: Default::default(),
        max_token_lifetime: broker::auth::MAX_LIFETIME,
    };
    let ledger = Arc::new(broker::cli::serve::open_or_init(&args)?);
    let operator = ledger::keyfile::read_private_key(&dir.path().join("ledger/ledger.key"))?;
    let running = server::serve(
        Broker::new(ledger.clone(), dir.path())?,
        ServeOptions {
            listen: args.listen,
            tls: None,
            drain: server::DRAIN,
        },
    )
    .await?;
    let url = format!("http://{}", running.addr);

    let key = |name: &str| SignerKey::generate(name);
    let (hospital, irb, alice, sponsor) = (
        key("hospital")?,
        key("irb")?,
        key("alice")?,
        key("sponsor")?,
    );
    for (k, role) in [
        (&hospital, "custodian"),
        (&irb, "irb"),
        (&alice, "researcher"),
        (&sponsor, "sponsor"),
    ] {
        let json = serde_json::json!({"id": k.name(), "role": role, "key": k.verifier().to_text()});
        ledger.append(signed(&operator, "principal_registered", json)?)?;
    }

    eprintln!("writing {rows} rows ({patients} patients)...");
    let file = dir.path().join("visits.parquet");
    write_data(&file, rows, patients)?;
    let mut registry = v1::registry_client::RegistryClient::new(auth(&url, &hospital)?)
        .max_encoding_message_size(server::MAX_MESSAGE);
    for (dataset, basis) in [
        ("optin", ConsentBasis::OptIn),
        ("optout", ConsentBasis::OptOut),
    ] {
        let files = vec![("visits/part-0.parquet".to_owned(), file.as_path())];
        let reg = client::dataset_body(
            "hospital",
            dataset,
            1,
            basis,
            "patient_id",
            POLICY,
            &[("visits", files.clone())],
        )?;
        let msgs = client::upload_messages(&hospital, reg, POLICY, &files)?;
        registry.register_dataset(tokio_stream::iter(msgs)).await?;
    }

    let consented = patients.div_ceil(2);
    eprintln!("recording {consented} consents on the ledger...");
    let t = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let threads = 16;
        let handles: Vec<_> = (0..threads)
            .map(|th| {
                let (ledger, hospital) = (&ledger, &hospital);
                s.spawn(move || -> anyhow::Result<()> {
                    for p in (th * 2..patients).step_by(2 * threads) {
                        let json = serde_json::json!({
                            "consent_id": format!("c{p}"), "subject": p.to_string(),
                            "scope": {"datasets": ["optin"]}, "purposes": ["GRU"],
                            "valid_from": "2020-01-01T00:00:00Z", "grantor": "hospital",
                        });
                        ledger.append(signed(hospital, "consent_granted", json)?)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().expect("a consent thread panicked")?;
        }
        Ok(())
    })?;
    eprintln!(
        "  {consented} consents in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let study = serde_json::json!({
        "study": "bench", "title": "Benchmark", "sponsor": "sponsor", "pi": "alice",
        "researchers": ["alice"], "purpose": "HMB", "commercial": false,
        "datasets": ["optin", "optout"],
    });
    ledger.append(signed(&alice, "study_registered", study)?)?;
    let grant =
        |d: &str| serde_json::json!({"dataset": d, "epsilon": 1e6, "delta": 0.0, "dp": true});
    let approval = serde_json::json!({
        "study": "bench", "grants": [grant("optin"), grant("optout")],
        "valid_from": "2020-01-01T00:00:00Z", "valid_until": "2099-01-01T00:00:00Z",
    });
    ledger.append(signed(&irb, "study_approved", approval)?)?;

    let counter = Arc::new(AtomicU64::new(0));
    for d in ["optin", "optout"] {
        // First query: loads the version (digests checked) and converts the consent filter.
        let t = Instant::now();
        measure(&url, &alice, d, 1, 1, &counter).await?;
        eprintln!(
            "first query on {d}: {:.0} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
    }

    let sql = std::env::var("CONSENTRY_BENCH_SQL")
        .unwrap_or_else(|_| "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex".into());
    println!(
        "{sql}: over {rows} rows via gRPC ({consented} of {patients} patients consented in optin)"
    );
    println!(
        "{:<8} {:>7} {:>8} {:>9} {:>9} {:>9}",
        "dataset", "clients", "queries", "p50 ms", "p99 ms", "QPS"
    );
    let mut p50 = std::collections::HashMap::new();
    for clients in [1usize, 32] {
        // Alternate the datasets so both see the same machine load.
        for round in 0..2 {
            for d in ["optin", "optout"] {
                let per = (queries / clients / 2).max(1);
                let (mut lat, wall) = measure(&url, &alice, d, clients, per, &counter).await?;
                lat.sort();
                let n = lat.len();
                let entry = p50.entry((d, clients)).or_insert_with(Vec::new);
                entry.extend(lat.iter().copied());
                println!(
                    "{d:<8} {clients:>7} {n:>8} {:>9.2} {:>9.2} {:>9.1}   (round {round})",
                    percentile(&lat, 0.5),
                    percentile(&lat, 0.99),
                    n as f64 / wall.as_secs_f64()
                );
            }
        }
    }
    for clients in [1usize, 32] {
        let mut a = p50[&("optin", clients)].clone();
        let mut b = p50[&("optout", clients)].clone();
        a.sort();
        b.sort();
        println!(
            "consent filter overhead, {clients} client(s): p50 {:.2} ms vs {:.2} ms = {:+.1}%",
            percentile(&a, 0.5),
            percentile(&b, 0.5),
            (percentile(&a, 0.5) / percentile(&b, 0.5) - 1.0) * 100.0
        );
    }
    running.shutdown().await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}
