//! A broker with principals, a dataset, consents and an approved study, as the stories need.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use broker::client::{self, Bearer};
use broker::server::{self, Broker, Running, ServeOptions};
use ledger::entry::{Body, ConsentBasis};
use ledger::note::SignerKey;
use proto::v1;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const POLICY: &str = r#"
privacy_unit = "patient_id"
max_rows_per_unit = 5

[tables.visits.columns]
patient_id = { class = "privacy_unit" }
name = { class = "direct_identifier" }
sex = { class = "public", domain = ["F", "M"] }
zip = { class = "quasi_identifier", generalize = "zip3" }
hba1c = { class = "sensitive", bounds = [4.0, 14.0] }
"#;

/// Patients in the dataset: ids 1000..1000+PATIENTS, two visits each.
pub const PATIENTS: i64 = 200;
/// Patients with a recorded consent: the first CONSENTED.
pub const CONSENTED: i64 = 150;
/// Patients 0..RARE_ZIPS live in ZIP codes of their own (distinct three-digit prefixes), so
/// k-anonymous extracts suppress their rows.
pub const RARE_ZIPS: i64 = 5;

/// Patient `p`'s ZIP code: a rare one, a restricted prefix (036, released as 000) for the next
/// five, then two common areas.
pub fn zip_of(p: i64) -> String {
    match p {
        p if p < RARE_ZIPS => format!("{}0000", 5 + p),
        p if p < RARE_ZIPS + 5 => "03601".into(),
        p if p % 2 == 0 => "02139".into(),
        _ => "10001".into(),
    }
}

pub type Auth = InterceptedService<Channel, Bearer>;

pub struct World {
    pub dir: tempfile::TempDir,
    pub running: Option<Running>,
    pub ledger: Arc<ledger::Ledger>,
    pub url: String,
    pub operator: SignerKey,
}

pub fn key(name: &str) -> SignerKey {
    // Deterministic per name, so every story can rebuild the key it needs.
    let mut seed = [7u8; 32];
    for (i, b) in name.bytes().enumerate() {
        seed[i % 32] ^= b.wrapping_mul(31).wrapping_add(i as u8);
    }
    SignerKey::from_seed(name, seed).unwrap()
}

pub fn body(kind: &str, json: serde_json::Value) -> Body {
    Body::from_json(kind, &json.to_string()).unwrap()
}

pub fn visits() -> RecordBatch {
    let (mut pid, mut name, mut sex, mut h) = (vec![], vec![], vec![], vec![]);
    let mut zip = vec![];
    for p in 0..PATIENTS {
        for v in 0..2 {
            pid.push(1000 + p);
            name.push(format!("Patient {p}"));
            sex.push(if p % 2 == 0 { "F" } else { "M" });
            zip.push(zip_of(p));
            h.push(5.0 + ((p * 7 + v * 3) % 80) as f64 / 10.0);
        }
    }
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("patient_id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, false),
            Field::new("sex", DataType::Utf8, false),
            Field::new("hba1c", DataType::Float64, false),
            Field::new("zip", DataType::Utf8, false),
        ])),
        vec![
            Arc::new(Int64Array::from(pid)),
            Arc::new(StringArray::from(name)),
            Arc::new(StringArray::from(sex)),
            Arc::new(Float64Array::from(h)),
            Arc::new(StringArray::from(zip)),
        ],
    )
    .unwrap()
}

pub fn write_parquet(path: &Path, batch: &RecordBatch) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

impl World {
    /// A broker with an operator only.
    pub async fn empty() -> World {
        let dir = tempfile::tempdir().unwrap();
        let (running, ledger) = Self::start(dir.path()).await;
        let operator =
            ledger::keyfile::read_private_key(&dir.path().join("ledger/ledger.key")).unwrap();
        let url = format!("http://{}", running.addr);
        World {
            dir,
            running: Some(running),
            ledger,
            url,
            operator,
        }
    }

    async fn start(data_dir: &Path) -> (Running, Arc<ledger::Ledger>) {
        let args = broker::cli::serve::ServeArgs {
            data_dir: data_dir.to_owned(),
            listen: "127.0.0.1:0".parse().unwrap(),
            tls_cert: None,
            tls_key: None,
            origin: "test.consentry/ledger".into(),
            operator: "operator".into(),
            limits: Default::default(),
            max_token_lifetime: broker::auth::MAX_LIFETIME,
        };
        let ledger = Arc::new(broker::cli::serve::open_or_init(&args).unwrap());
        let broker = Broker::new(ledger.clone(), data_dir).unwrap();
        let running = server::serve(
            broker,
            ServeOptions {
                listen: args.listen,
                tls: None,
                drain: std::time::Duration::from_secs(10),
            },
        )
        .await
        .unwrap();
        (running, ledger)
    }

    /// Stops the broker, closes its ledger and starts a new one over the same data directory
    /// (a restart).
    pub async fn restart(mut self) -> World {
        self.running.take().unwrap().shutdown().await.unwrap();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let operator = clone_key(&self.operator);
        drop(self);
        let (running, ledger) = Self::start(dir.path()).await;
        World {
            url: format!("http://{}", running.addr),
            dir,
            running: Some(running),
            ledger,
            operator,
        }
    }

    /// A broker with principals, the `visits` dataset (opt-in), consents for the first
    /// CONSENTED patients, and study `s1` (researcher alice, sponsor pharma) approved by `irb`
    /// with epsilon `eps` on `visits`.
    pub async fn ready(eps: f64) -> World {
        let w = World::empty().await;
        for (id, role, subject) in [
            ("hospital", "custodian", None),
            ("irb", "irb", None),
            ("irb2", "irb", None),
            ("alice", "researcher", None),
            ("bob", "researcher", None),
            ("pharma", "sponsor", None),
            ("rival", "sponsor", None),
            ("p1000", "patient", Some("1000")),
            ("p1001", "patient", Some("1001")),
        ] {
            w.register(id, role, subject).await;
        }
        w.register_visits("visits", 1).await.unwrap();
        let hospital = key("hospital");
        let mut c = w.consent(&hospital);
        for p in 0..CONSENTED {
            let b = body(
                "consent_granted",
                serde_json::json!({
                    "consent_id": format!("c-{}", 1000 + p),
                    "subject": (1000 + p).to_string(),
                    "scope": {"custodian": "hospital"},
                    "purposes": ["GRU"],
                    "valid_from": "2020-01-01T00:00:00Z",
                    "grantor": "hospital",
                }),
            );
            c.grant(client::sign(&hospital, b).unwrap()).await.unwrap();
        }
        w.register_study("s1", "alice", "pharma").await;
        w.approve("s1", "irb", eps, 1e-6).await;
        w
    }

    pub fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .unwrap()
            .connect_lazy()
    }

    fn auth(&self, k: &SignerKey) -> Auth {
        InterceptedService::new(self.channel(), Bearer::new(clone_key(k)))
    }

    pub fn registry(&self, k: &SignerKey) -> v1::registry_client::RegistryClient<Auth> {
        v1::registry_client::RegistryClient::new(self.auth(k))
    }
    pub fn consent(&self, k: &SignerKey) -> v1::consent_client::ConsentClient<Auth> {
        v1::consent_client::ConsentClient::new(self.auth(k))
    }
    pub fn query(&self, k: &SignerKey) -> v1::query_client::QueryClient<Auth> {
        v1::query_client::QueryClient::new(self.auth(k))
    }
    pub fn audit(&self, k: &SignerKey) -> v1::audit_client::AuditClient<Auth> {
        v1::audit_client::AuditClient::new(self.auth(k))
    }
    pub fn ledger_client(&self, k: &SignerKey) -> v1::ledger_client::LedgerClient<Auth> {
        v1::ledger_client::LedgerClient::new(self.auth(k))
    }

    pub async fn register(&self, id: &str, role: &str, subject: Option<&str>) {
        let mut json = serde_json::json!({
            "id": id, "role": role, "key": key(id).verifier().to_text(),
        });
        if let Some(s) = subject {
            json["subject"] = s.into();
        }
        let e = client::sign(&self.operator, body("principal_registered", json)).unwrap();
        self.registry(&self.operator).append(e).await.unwrap();
    }

    pub fn data_file(&self, name: &str, batch: &RecordBatch) -> PathBuf {
        let p = self.dir.path().join(name);
        write_parquet(&p, batch);
        p
    }

    /// Uploads `visits` as a version of `dataset`, signed by the hospital.
    pub async fn register_visits(
        &self,
        dataset: &str,
        version: u32,
    ) -> Result<v1::Appended, tonic::Status> {
        let file = self.data_file(&format!("{dataset}-{version}.parquet"), &visits());
        self.upload(&key("hospital"), dataset, version, POLICY, &file)
            .await
    }

    pub async fn upload(
        &self,
        k: &SignerKey,
        dataset: &str,
        version: u32,
        policy: &str,
        file: &Path,
    ) -> Result<v1::Appended, tonic::Status> {
        let files = vec![("visits/part-0.parquet".to_owned(), file)];
        let reg = client::dataset_body(
            k.name(),
            dataset,
            version,
            ConsentBasis::OptIn,
            "patient_id",
            policy,
            &[("visits", files.clone())],
        )
        .unwrap();
        let msgs = client::upload_messages(k, reg, policy, &files).unwrap();
        self.registry(k)
            .register_dataset(tokio_stream_iter(msgs))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn register_study(&self, study: &str, pi: &str, sponsor: &str) {
        let pik = key(pi);
        let b = body(
            "study_registered",
            serde_json::json!({
                "study": study, "title": format!("Study {study}"), "sponsor": sponsor,
                "pi": pi, "researchers": [pi], "purpose": "HMB", "commercial": false,
                "datasets": ["visits"],
            }),
        );
        self.registry(&pik)
            .append(client::sign(&pik, b).unwrap())
            .await
            .unwrap();
    }

    pub async fn approve(&self, study: &str, irb: &str, eps: f64, delta: f64) {
        let grant =
            serde_json::json!({"dataset": "visits", "epsilon": eps, "delta": delta, "dp": true});
        self.approve_grant(study, irb, grant).await;
    }

    /// Approves `study` with one grant (a JSON object of `study_approved`'s `grants`).
    pub async fn approve_grant(&self, study: &str, irb: &str, grant: serde_json::Value) {
        let k = key(irb);
        let b = body(
            "study_approved",
            serde_json::json!({
                "study": study,
                "grants": [grant],
                "valid_from": "2020-01-01T00:00:00Z",
                "valid_until": "2099-01-01T00:00:00Z",
            }),
        );
        self.registry(&k)
            .append(client::sign(&k, b).unwrap())
            .await
            .unwrap();
    }

    /// Registers `study` (PI alice, sponsor pharma), approved by `irb` for extracts of
    /// `visits` with k = 5 and no DP aggregates.
    pub async fn extract_study(&self, study: &str) {
        self.register_study(study, "alice", "pharma").await;
        let grant = serde_json::json!({
            "dataset": "visits", "epsilon": 1.0, "delta": 0.0, "dp": false, "extract_k": 5,
        });
        self.approve_grant(study, "irb", grant).await;
    }

    pub fn extract(study: &str, sql: &str) -> v1::QueryRequest {
        v1::QueryRequest {
            mode: v1::Mode::Extract as i32,
            ..World::dp(study, sql, 0.0)
        }
    }

    pub fn dp(study: &str, sql: &str, eps: f64) -> v1::QueryRequest {
        v1::QueryRequest {
            study: study.into(),
            dataset: "visits".into(),
            sql: sql.into(),
            mode: v1::Mode::Dp as i32,
            epsilon: eps,
            delta: 0.0,
            mechanism: String::new(),
            accuracy: 0.0,
        }
    }

    /// Runs a DP query as `k`.
    pub async fn run(
        &self,
        k: &SignerKey,
        req: v1::QueryRequest,
    ) -> Result<(v1::QueryHeader, Vec<RecordBatch>), tonic::Status> {
        let stream = self.query(k).run(req).await?.into_inner();
        Ok(client::collect_query(stream).await.unwrap())
    }

    /// The receipt at `index`.
    pub fn receipt(&self, index: u64) -> ledger::entry::QueryReceipt {
        match self.ledger.entry(index).unwrap().entry.body {
            Body::QueryReceipt(r) => r,
            b => panic!("entry {index} is a {}", b.kind()),
        }
    }

    /// The receipt index a refusal message names.
    pub fn receipt_of(status: &tonic::Status) -> u64 {
        let m = status.message();
        let at = m.rfind("(receipt ").expect("the refusal names its receipt");
        m[at + 9..m.len() - 1].parse().unwrap()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // The server task ends with the test's runtime.
        let _ = self.running.take();
    }
}

pub fn clone_key(k: &SignerKey) -> SignerKey {
    SignerKey::parse(&k.to_text()).unwrap()
}

pub fn tokio_stream_iter<T: Send + 'static>(
    items: Vec<T>,
) -> impl tokio_stream::Stream<Item = T> + Send + 'static {
    tokio_stream::iter(items)
}
