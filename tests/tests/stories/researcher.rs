//! The researcher: DP queries within a study, with receipts, budgets and every refusal.

use arrow::array::{AsArray, Float64Array};
use arrow::datatypes::Int64Type;
use proto::v1;
use tonic::Code;

use crate::world::{CONSENTED, World, key};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dp_count_is_released_with_its_receipt_and_budget() {
    let w = World::ready(1.0).await;
    let alice = key("alice");
    let (h, batches) = w
        .run(
            &alice,
            World::dp(
                "s1",
                "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex",
                0.5,
            ),
        )
        .await
        .unwrap();
    // Both keys of the public domain, with noisy counts near the consented truth.
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 2);
    let total: i64 = batches
        .iter()
        .flat_map(|b| {
            b.column_by_name("n")
                .unwrap()
                .as_primitive::<Int64Type>()
                .values()
                .to_vec()
        })
        .sum();
    // 2 visits per consented patient; Laplace noise of scale ~ 5 / 0.5 per cell.
    assert!((total - 2 * CONSENTED).abs() < 200, "total {total}");
    assert!(batches[0].column_by_name("n_ci95").is_some());

    let b = h.budget.unwrap();
    assert!((h.epsilon_spent - 0.5).abs() < 1e-9);
    assert!((b.epsilon_left - 0.5).abs() < 1e-9, "{b:?}");
    let r = w.receipt(h.receipt_index);
    assert_eq!(r.outcome, ledger::entry::Outcome::Released);
    assert_eq!(r.researcher.as_str(), "alice");
    assert_eq!(r.dataset.as_ref().unwrap().as_str(), "visits");
    assert_eq!(
        r.result_digest.as_ref().unwrap().to_string(),
        h.result_digest
    );
    assert_eq!(
        r.consent_digest.as_ref().unwrap().to_string(),
        h.consent_digest
    );
    assert_eq!(r.sql, h.normalized_sql);
    assert!((r.epsilon - 0.5).abs() < 1e-12);

    // An identical repeat returns the same answer and spends nothing.
    let (h2, _) = w
        .run(
            &alice,
            World::dp(
                "s1",
                "select sex, COUNT(*) as n\n  from visits   group by sex -- the same query",
                0.5,
            ),
        )
        .await
        .unwrap();
    assert!(h2.repeated);
    assert_eq!(h2.result_digest, h.result_digest);
    assert_eq!(h2.epsilon_spent, 0.0);
    assert!((h2.budget.unwrap().epsilon_left - 0.5).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_have_the_right_code_and_a_receipt() {
    let w = World::ready(1.0).await;
    let alice = key("alice");
    let size = |w: &World| w.ledger.size();

    // No token at all: Unauthenticated, and nothing is written (no principal to receipt).
    let before = size(&w);
    let mut anon = proto::v1::query_client::QueryClient::new(w.channel());
    let e = anon
        .run(World::dp("s1", "SELECT COUNT(*) FROM visits", 0.1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(size(&w), before);

    // A key that is not registered.
    let e = w
        .run(
            &key("mallory"),
            World::dp("s1", "SELECT COUNT(*) FROM visits", 0.1),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let cases: Vec<(ledger::note::SignerKey, proto::v1::QueryRequest, Code)> = vec![
        // Not a member of the study.
        (
            key("bob"),
            World::dp("s1", "SELECT COUNT(*) FROM visits", 0.1),
            Code::PermissionDenied,
        ),
        // Not a researcher at all.
        (
            key("pharma"),
            World::dp("s1", "SELECT COUNT(*) FROM visits", 0.1),
            Code::PermissionDenied,
        ),
        // Unknown study.
        (
            alice.clone_for_test(),
            World::dp("nope", "SELECT COUNT(*) FROM visits", 0.1),
            Code::NotFound,
        ),
        // Rows would leave.
        (
            alice.clone_for_test(),
            World::dp("s1", "SELECT * FROM visits", 0.1),
            Code::InvalidArgument,
        ),
        // A direct identifier.
        (
            alice.clone_for_test(),
            World::dp("s1", "SELECT name, COUNT(*) FROM visits GROUP BY name", 0.1),
            Code::InvalidArgument,
        ),
        // Not SQL.
        (
            alice.clone_for_test(),
            World::dp("s1", "SELEKT 1", 0.1),
            Code::InvalidArgument,
        ),
        // More than the budget.
        (
            alice.clone_for_test(),
            World::dp("s1", "SELECT COUNT(*) FROM visits", 5.0),
            Code::ResourceExhausted,
        ),
        // Extracts are not approved for this study.
        (
            alice.clone_for_test(),
            proto::v1::QueryRequest {
                mode: proto::v1::Mode::Extract as i32,
                ..World::dp("s1", "SELECT sex FROM visits", 0.0)
            },
            Code::PermissionDenied,
        ),
    ];
    for (k, req, code) in cases {
        let sql = req.sql.clone();
        let e = w.run(&k, req).await.unwrap_err();
        assert_eq!(e.code(), code, "{sql}: {e:?}");
        let r = w.receipt(World::receipt_of(&e));
        assert_eq!(r.outcome, ledger::entry::Outcome::Denied, "{sql}");
        assert_eq!(r.researcher.as_str(), k.name());
        assert_eq!(r.epsilon, 0.0);
        assert!(!r.reason.unwrap_or_default().is_empty());
    }
    // Nothing was spent by any refusal.
    assert_eq!(w.ledger.state().spent("s1", "visits"), Default::default());
}

trait CloneKey {
    fn clone_for_test(&self) -> ledger::note::SignerKey;
}

impl CloneKey for ledger::note::SignerKey {
    fn clone_for_test(&self) -> ledger::note::SignerKey {
        crate::world::clone_key(self)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_queries_never_overspend() {
    // A budget for exactly 10 queries of epsilon 0.1, and 100 distinct queries at once.
    let w = std::sync::Arc::new(World::ready(1.0).await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let w = w.clone();
        tasks.spawn(async move {
            let sql = format!("SELECT COUNT(*) AS n FROM visits WHERE hba1c > {i}.5");
            w.run(&key("alice"), World::dp("s1", &sql, 0.1)).await
        });
    }
    let (mut ok, mut exhausted) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(_) => ok += 1,
            Err(e) if e.code() == Code::ResourceExhausted => exhausted += 1,
            Err(e) => panic!("unexpected refusal {e:?}"),
        }
    }
    assert_eq!(ok, 10, "released");
    assert_eq!(exhausted, 90);
    let spent = w.ledger.state().spent("s1", "visits").epsilon;
    assert!(spent <= 1.0 + 1e-9, "spent {spent}");
    assert!((spent - 1.0).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_gaussian_queries_never_overspend_the_converted_grant() {
    // A grant of (1, 1e-6) holds rho of about 0.023 (OpenDP's conversion at half the delta);
    // each query asks a tenth of it and a bit (rho = epsilon^2 / 2): 10 fit, 100 ask at once.
    let w = std::sync::Arc::new(World::ready(1.0).await);
    let total = w.ledger.state().account("s1", "visits").unwrap().rho_left();
    let eps = (2.0 * total / 10.5).sqrt();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let w = w.clone();
        tasks.spawn(async move {
            let sql = format!("SELECT COUNT(*) AS n FROM visits WHERE hba1c > {i}.5");
            let q = v1::QueryRequest {
                mechanism: "gaussian".into(),
                ..World::dp("s1", &sql, eps)
            };
            w.run(&key("alice"), q).await
        });
    }
    let (mut ok, mut exhausted) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok((h, _)) => {
                assert_eq!(h.mechanism, "gaussian");
                assert!(h.rho_spent > 0.0 && h.rho_spent <= eps * eps / 2.0 * (1.0 + 1e-9));
                ok += 1;
            }
            Err(e) if e.code() == Code::ResourceExhausted => exhausted += 1,
            Err(e) => panic!("unexpected refusal {e:?}"),
        }
    }
    assert_eq!((ok, exhausted), (10, 90));
    let (account, rho) = {
        let st = w.ledger.state();
        let rho: f64 = st
            .receipts_of_study("s1")
            .iter()
            .filter_map(|&i| match w.receipt(i) {
                r if r.outcome == ledger::entry::Outcome::Released => r.rho,
                _ => None,
            })
            .sum();
        (st.account("s1", "visits").unwrap(), rho)
    };
    let g = account.guarantee();
    assert_eq!(g.accountant, "zcdp");
    assert!(g.epsilon <= 1.0 + 1e-9 && g.delta <= 1e-6, "{g:?}");
    // What the receipts say is what the account holds.
    assert!((rho - account.spent.rho).abs() < 1e-12);
    // A pure query of any size no longer composes by addition: refused too.
    let e = w
        .run(
            &key("alice"),
            World::dp("s1", "SELECT COUNT(*) FROM visits", 0.2),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // The IRB's burn-down shows rho and the (epsilon, delta) it amounts to.
    let points = w
        .audit(&key("irb"))
        .budget_usage(v1::BudgetUsageRequest { study: "s1".into() })
        .await
        .unwrap()
        .into_inner()
        .points;
    let last = points.last().unwrap();
    assert_eq!(points.len(), 10);
    assert!((last.rho_cumulative - account.spent.rho).abs() < 1e-12);
    assert!((last.epsilon_guaranteed - g.epsilon).abs() < 1e-9);
}

/// A Gaussian query with several pure parts (partition selection and quantiles, each
/// epsilon_i with rho epsilon_i^2 / 2) is released and charged its rho, whether or not any
/// group clears the threshold: how it ends never depends on the data for free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gaussian_queries_with_several_pure_parts_are_charged_whatever_the_data() {
    let w = World::ready(10.0).await;
    let before = w.ledger.state().spent("s1", "visits");
    let mut charged = 0.0;
    for (i, cut) in [0.0, 1e9].iter().enumerate() {
        // With no cut every zip clears the threshold; with an impossible one, none does.
        let sql = format!(
            "SELECT zip, MEDIAN(hba1c) AS m{i}, APPROX_PERCENTILE_CONT(hba1c, 0.9) AS p{i} \
             FROM visits WHERE hba1c >= {cut} GROUP BY zip"
        );
        let q = v1::QueryRequest {
            mechanism: "gaussian".into(),
            delta: 1e-7,
            ..World::dp("s1", &sql, 0.5)
        };
        let (h, _) = w.run(&key("alice"), q).await.unwrap();
        assert_eq!(h.mechanism, "gaussian");
        assert!(
            h.rho_spent > 0.0 && h.rho_spent <= 0.125 * (1.0 + 1e-9),
            "{}",
            h.rho_spent
        );
        charged += h.rho_spent;
    }
    let after = w.ledger.state().spent("s1", "visits");
    assert!((after.rho - before.rho - charged).abs() < 1e-12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn averages_are_noisy_but_near_the_truth() {
    let w = World::ready(10.0).await;
    let (_, batches) = w
        .run(
            &key("alice"),
            World::dp("s1", "SELECT AVG(hba1c) AS m FROM visits", 5.0),
        )
        .await
        .unwrap();
    let m = batches[0]
        .column_by_name("m")
        .unwrap()
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap()
        .value(0);
    assert!((4.0..=14.0).contains(&m), "{m}");
}

/// (pseudonym, zip) of every released row.
fn extract_rows(batches: &[arrow::array::RecordBatch]) -> Vec<(String, String)> {
    let mut rows = vec![];
    for b in batches {
        let pid = b.column_by_name("patient_id").unwrap().as_string::<i32>();
        let zip = b.column_by_name("zip").unwrap().as_string::<i32>();
        for i in 0..b.num_rows() {
            rows.push((pid.value(i).to_owned(), zip.value(i).to_owned()));
        }
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_extract_is_generalized_pseudonymized_k_anonymous_and_receipted() {
    use std::collections::{BTreeMap, BTreeSet};

    use crate::world::RARE_ZIPS;

    let w = World::ready(1.0).await;
    for s in ["x1", "x2", "x3"] {
        w.extract_study(s).await;
    }
    let alice = key("alice");
    let sql = "SELECT patient_id, zip, sex, hba1c FROM visits";
    let (h, batches) = w.run(&alice, World::extract("x1", sql)).await.unwrap();
    let rows = extract_rows(&batches);

    // Counted independently: every ZIP class is shared by at least k = 5 patients.
    let mut classes: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (pid, zip) in &rows {
        classes.entry(zip).or_default().insert(pid);
    }
    for (zip, patients) in &classes {
        assert!(patients.len() >= 5, "class {zip} has {}", patients.len());
    }
    // Three-digit ZIPs, the restricted 036 released as 000. Classes are over every
    // non-sensitive column, sex too: the five patients with ZIP codes of their own and the
    // five in 036 (two women, three men) are suppressed (two visits each), and the count is
    // reported.
    assert_eq!(classes.keys().copied().collect::<Vec<_>>(), ["021", "100"]);
    let suppressed = 2 * (RARE_ZIPS + 5);
    assert_eq!(h.rows_suppressed, suppressed as u64);
    assert_eq!(rows.len() as i64, 2 * CONSENTED - suppressed);
    // Pseudonyms, never the ids.
    let pseudonyms: BTreeSet<&str> = rows.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(pseudonyms.len() as i64, CONSENTED - RARE_ZIPS - 5);
    for p in &pseudonyms {
        assert!(
            p.len() == 64 && p.bytes().all(|b| b.is_ascii_hexdigit()),
            "{p}"
        );
    }

    // The receipt: mode, k, the suppressed rows, the digests; no budget spent.
    let r = w.receipt(h.receipt_index);
    assert_eq!(r.outcome, ledger::entry::Outcome::Released);
    assert_eq!(r.mode, ledger::entry::QueryMode::Extract);
    assert_eq!(r.rows_suppressed, Some(suppressed as u64));
    assert_eq!(r.mechanism["k"], serde_json::json!(5));
    assert_eq!(
        r.mechanism["quasi_identifiers"],
        serde_json::json!(["zip", "sex"])
    );
    assert_eq!(
        r.result_digest.as_ref().unwrap().to_string(),
        h.result_digest
    );
    assert_eq!(r.epsilon, 0.0);
    assert_eq!(w.ledger.state().spent("x1", "visits"), Default::default());

    // The same extract again gets the same pseudonyms; another study's are unrelated.
    let (_, again) = w.run(&alice, World::extract("x1", sql)).await.unwrap();
    let again: BTreeSet<String> = extract_rows(&again).into_iter().map(|r| r.0).collect();
    assert_eq!(
        again,
        pseudonyms
            .iter()
            .map(|p| p.to_string())
            .collect::<BTreeSet<_>>()
    );
    let (_, other) = w.run(&alice, World::extract("x2", sql)).await.unwrap();
    let other: BTreeSet<String> = extract_rows(&other).into_iter().map(|r| r.0).collect();
    assert_eq!(other.len(), pseudonyms.len());
    assert!(other.iter().all(|p| !pseudonyms.contains(p.as_str())));

    // Refusals, each receipted as a denied extract (in a study that took no extract yet: x1
    // may only repeat its own).
    let cases = [
        ("SELECT name FROM visits", 0.0, Code::InvalidArgument),
        ("SELECT * FROM visits", 0.0, Code::InvalidArgument),
        (
            "SELECT patient_id FROM visits WHERE zip = '02139'",
            0.0,
            Code::InvalidArgument,
        ),
        ("SELECT sex FROM visits", 0.5, Code::InvalidArgument),
    ];
    for (sql, eps, code) in cases {
        let req = proto::v1::QueryRequest {
            epsilon: eps,
            ..World::extract("x3", sql)
        };
        let e = w.run(&alice, req).await.unwrap_err();
        assert_eq!(e.code(), code, "{sql}: {e:?}");
        let r = w.receipt(World::receipt_of(&e));
        assert_eq!(r.outcome, ledger::entry::Outcome::Denied, "{sql}");
        assert_eq!(r.mode, ledger::entry::QueryMode::Extract);
    }
    // DP aggregates are not approved for x1.
    let e = w
        .run(&alice, World::dp("x1", "SELECT COUNT(*) FROM visits", 0.1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeats_stay_free_and_identical_across_restarts() {
    let w = World::ready(1.0).await;
    let alice = key("alice");
    let sql = "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex";
    let (h1, b1) = w.run(&alice, World::dp("s1", sql, 0.5)).await.unwrap();
    assert!(!h1.repeated);

    let w = w.restart().await;
    let (h2, b2) = w.run(&alice, World::dp("s1", sql, 0.5)).await.unwrap();
    assert!(h2.repeated, "the kept release answers the repeat");
    assert_eq!(h2.result_digest, h1.result_digest);
    assert_eq!(b2, b1);
    assert_eq!(h2.epsilon_spent, 0.0);
    assert!((h2.budget.unwrap().epsilon_left - 0.5).abs() < 1e-9);

    // A kept release that its receipt does not confirm is never served: here it points at
    // another entry. The query is then answered afresh, and paid for.
    let dir = w.dir.path().join("releases/visits/1");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one release kept");
    let mut kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    // Its checksum is made to match: the receipt check itself refuses it.
    kept["receipt"] = serde_json::json!(h1.receipt_index - 1);
    let map = kept.as_object_mut().unwrap();
    map.remove("sha256")
        .expect("a kept release carries its checksum");
    let sum = ledger::ids::Digest::of(&serde_json::to_vec(&kept).unwrap()).to_string();
    kept["sha256"] = serde_json::json!(sum);
    std::fs::write(&files[0], serde_json::to_vec(&kept).unwrap()).unwrap();
    let w = w.restart().await;
    let (h3, _) = w.run(&alice, World::dp("s1", sql, 0.5)).await.unwrap();
    assert!(!h3.repeated);
    assert_ne!(h3.result_digest, h1.result_digest);
    assert!((h3.epsilon_spent - 0.5).abs() < 1e-9);
    assert!(h3.budget.unwrap().epsilon_left.abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_kept_release_is_ignored_never_fatal() {
    // One flipped byte anywhere in a kept release (its rows' Arrow bytes included, which once
    // panicked the reader while the engine loaded and made every later query on the dataset
    // fail): the dataset still loads and answers; the damaged release is not served.
    let w = World::ready(10.0).await;
    let alice = key("alice");
    let sql = "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex";
    let (h1, _) = w.run(&alice, World::dp("s1", sql, 0.5)).await.unwrap();
    let dir = w.dir.path().join("releases/visits/1");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let original = std::fs::read(&file).unwrap();
    let ipc_at = original
        .windows(7)
        .position(|x| x == b"\"ipc\":\"")
        .expect("the kept rows")
        + 7;
    let mut w = w;
    // In the rows (base64: a different byte decodes to other Arrow bytes), in the receipt
    // number, and in the epsilon asked.
    // Then rows damaged under a checksum made to match them: what the Arrow reader gets.
    let resummed = |bytes: &[u8]| {
        let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
            return bytes.to_vec();
        };
        v.as_object_mut().unwrap().remove("sha256");
        let sum = ledger::ids::Digest::of(&serde_json::to_vec(&v).unwrap()).to_string();
        v["sha256"] = serde_json::json!(sum);
        serde_json::to_vec(&v).unwrap()
    };
    let damages = [
        ipc_at + 40,
        ipc_at + 200,
        ipc_at + 600,
        original.len() / 3,
        12,
    ]
    .map(|at| (at, false))
    .into_iter()
    .chain([ipc_at + 12, ipc_at + 30, ipc_at + 100, ipc_at + 300].map(|at| (at, true)));
    for (at, resum) in damages {
        let mut bytes = original.clone();
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        if resum {
            bytes = resummed(&bytes);
        }
        std::fs::write(&file, &bytes).unwrap();
        if !resum {
            // `broker check` names it.
            let args = broker::cli::check::CheckArgs {
                data_dir: w.dir.path().to_owned(),
            };
            let e = broker::cli::check::run(args).unwrap_err().to_string();
            assert!(e.contains("kept release"), "byte {at}: {e}");
        }
        w = w.restart().await;
        let (h, _) = w
            .run(&alice, World::dp("s1", sql, 0.5))
            .await
            .unwrap_or_else(|e| panic!("byte {at}: {e:?}"));
        if resum && h.repeated {
            // The damage fell where the rows do not change (padding): what the receipt
            // recorded, served.
            assert_eq!(h.result_digest, h1.result_digest, "byte {at}");
        } else {
            assert!(!h.repeated, "byte {at}: a damaged release was served");
            assert_ne!(h.result_digest, h1.result_digest);
        }
        // Its own release is now kept (under the same key): put the damaged one back.
        std::fs::write(&file, &original).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_study_minimum_cell_size_suppresses_small_groups() {
    let w = World::ready(1.0).await;
    w.register_study("cms", "alice", "pharma").await;
    let grant = serde_json::json!({
        "dataset": "visits", "epsilon": 1.0, "delta": 0.0, "dp": true, "min_cell_size": 500,
    });
    w.approve_grant("cms", "irb", grant).await;
    let alice = key("alice");
    // About 150 visits per sex: both groups are under 500.
    let (h, batches) = w
        .run(
            &alice,
            World::dp(
                "cms",
                "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex",
                0.5,
            ),
        )
        .await
        .unwrap();
    assert_eq!(h.rows_suppressed, 2);
    assert_eq!(batches[0].column_by_name("n").unwrap().null_count(), 2);
    let r = w.receipt(h.receipt_index);
    assert_eq!(r.mechanism["min_cell_size"], serde_json::json!(500));
    assert_eq!(r.mechanism["cells_suppressed"], serde_json::json!(2));
    // Suppression is post-processing of the noisy answer: epsilon is spent as usual.
    assert!((h.epsilon_spent - 0.5).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refusal_never_echoes_a_huge_value() {
    // A 5 MB study name once came back whole in the status (60 MB took 17 s and 200 MB).
    let w = World::ready(1.0).await;
    let alice = key("alice");
    let huge = "s".repeat(5 << 20);
    for req in [
        World::dp(&huge, "SELECT COUNT(*) FROM visits", 0.1),
        proto::v1::QueryRequest {
            dataset: huge.clone(),
            ..World::dp("s1", "SELECT COUNT(*) FROM visits", 0.1)
        },
        proto::v1::QueryRequest {
            mechanism: huge.clone(),
            ..World::dp("s1", "SELECT COUNT(*) FROM visits", 0.1)
        },
    ] {
        let e = w.run(&alice, req).await.unwrap_err();
        assert!(e.message().len() < 1024, "{} bytes", e.message().len());
        assert!(e.message().contains("bytes)"), "{}", e.message());
    }
    let e = w
        .registry(&alice)
        .get_principal(proto::v1::GetPrincipalRequest { id: huge.clone() })
        .await
        .unwrap_err();
    assert!(e.message().len() < 1024, "{} bytes", e.message().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stock_grpc_tools_discover_the_services_by_reflection_v1_and_v1alpha() {
    // grpcio's reflection client, older grpcurl and Postman speak v1alpha only.
    let w = World::ready(1.0).await;
    use tonic_reflection::pb::{v1, v1alpha};
    let mut c1 = v1::server_reflection_client::ServerReflectionClient::new(w.channel());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut s = c1
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let listed = format!("{:?}", s.message().await.unwrap().unwrap());
    assert!(listed.contains("consentry.v1.Query"), "{listed}");
    let mut ca = v1alpha::server_reflection_client::ServerReflectionClient::new(w.channel());
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut s = ca
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let listed = format!("{:?}", s.message().await.unwrap().unwrap());
    assert!(listed.contains("consentry.v1.Query"), "{listed}");
}

/// Before spending, a researcher previews a query's cost and accuracy: the figures are those
/// of the release that follows, and the preview reads, spends and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_shows_cost_and_accuracy_before_spending() {
    let w = crate::world::World::ready(2.0).await;
    let alice = crate::world::key("alice");
    let sql = "SELECT sex, COUNT(*) AS n, AVG(hba1c) AS a FROM visits GROUP BY sex";
    let size = w.ledger.size();
    let p = w
        .query(&alice)
        .preview(crate::world::World::dp("s1", sql, 0.5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.ledger.size(), size, "no receipt, nothing written");
    assert_eq!((p.epsilon, p.mechanism.as_str()), (0.5, "laplace"));
    assert_eq!(p.budget.unwrap().epsilon_left, 2.0, "nothing spent");
    assert_eq!(p.statistics.len(), 2);
    let n_width = p.statistics[0].ci95.expect("a count's width is known");
    assert!(
        p.statistics[1].ci95.is_none(),
        "an average's depends on the group"
    );
    let (h, batches) = w
        .run(&alice, crate::world::World::dp("s1", sql, 0.5))
        .await
        .unwrap();
    assert!(
        (h.epsilon_spent - p.epsilon).abs() < 1e-6,
        "{}",
        h.epsilon_spent
    );
    let ci = batches[0]
        .column_by_name("n_ci95")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::Float64Array>()
        .unwrap()
        .value(0);
    assert!((ci - n_width).abs() < 1e-9, "{ci} vs {n_width}");
    // Refusals are the query's, without a receipt: a non-member, a direct identifier.
    let e = w
        .query(&crate::world::key("bob"))
        .preview(crate::world::World::dp("s1", sql, 0.5))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let e = w
        .query(&alice)
        .preview(crate::world::World::dp(
            "s1",
            "SELECT COUNT(*) FROM visits WHERE name = 'x'",
            0.5,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(w.ledger.size(), size + 1, "only the real query's receipt");
}

/// Partition selection says its threshold, and an answer with no group says why, in the same
/// words whether the rows held no group at all or only groups too small to reach it (the
/// note is post-processing of the released answer, never a view of the data).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_selection_says_its_threshold_and_why_nothing_came_back() {
    let w = World::ready(10.0).await;
    let q = |sql: &str, eps: f64| v1::QueryRequest {
        delta: 1e-7,
        ..World::dp("s1", sql, eps)
    };
    let rows = |b: &[arrow::array::RecordBatch]| b.iter().map(|b| b.num_rows()).sum::<usize>();
    let threshold_in = |note: &str| -> i64 {
        let (_, rest) = note.split_once("reaches ").expect(note);
        rest.split(';').next().unwrap().parse().expect(note)
    };
    // Two common areas of about 70 consented patients each: released, with the threshold.
    let (h, b) = w
        .run(
            &key("alice"),
            q(
                "SELECT zip, COUNT(DISTINCT patient_id) AS n FROM visits GROUP BY zip",
                4.0,
            ),
        )
        .await
        .unwrap();
    assert!(rows(&b) > 0);
    assert!(
        h.note.starts_with("keys chosen by partition selection")
            && h.note.contains("noisy patient count"),
        "{}",
        h.note
    );
    let t = threshold_in(&h.note);
    assert!(t > 1 && t < 70, "{t}");
    // No row at all, and rows of five patients each alone in their area: nothing released,
    // and the same words.
    let sql_none = "SELECT zip, COUNT(DISTINCT patient_id) AS n FROM visits WHERE hba1c > 1000 \
                    GROUP BY zip";
    let sql_small = "SELECT zip, COUNT(DISTINCT patient_id) AS n FROM visits WHERE zip IN \
                     ('50000', '60000', '70000', '80000', '90000') GROUP BY zip";
    let (h_none, b_none) = w.run(&key("alice"), q(sql_none, 1.0)).await.unwrap();
    let (h_small, b_small) = w.run(&key("alice"), q(sql_small, 1.0)).await.unwrap();
    assert_eq!((rows(&b_none), rows(&b_small)), (0, 0));
    assert!(
        h_none
            .note
            .starts_with("no group reached partition selection's threshold"),
        "{}",
        h_none.note
    );
    assert_eq!(h_none.note, h_small.note);
    assert!(threshold_in(&h_none.note) > t);
    // A query without partition selection has no note.
    let (h, _) = w
        .run(
            &key("alice"),
            World::dp(
                "s1",
                "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex",
                0.5,
            ),
        )
        .await
        .unwrap();
    assert_eq!(h.note, "");
}

/// LIKE with a literal pattern over Parquet text (read as string views, so the pattern is
/// coerced to one) is answered; a pattern that is not a literal is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn like_with_a_literal_pattern_is_answered_over_parquet() {
    let w = World::ready(5.0).await;
    let alice = key("alice");
    let (h, _) = w
        .run(
            &alice,
            World::dp(
                "s1",
                "SELECT COUNT(*) AS n FROM visits WHERE zip LIKE '1%'",
                0.5,
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        w.receipt(h.receipt_index).outcome,
        ledger::entry::Outcome::Released
    );
    let e = w
        .run(
            &alice,
            World::dp(
                "s1",
                "SELECT COUNT(*) AS n FROM visits WHERE zip LIKE sex",
                0.5,
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
}
