//! The hostile researcher: a member of an approved study with a stock client and unlimited
//! patience, trying each class of attack against a broker on 127.0.0.1:0. Every test judges by
//! ground truth (what the data holds, what the ledger debited), not by the message expected.

use std::collections::BTreeSet;

use ledger::entry::{Body, Outcome};
use tonic::Code;

use crate::world::{CONSENTED, PATIENTS, World, key, zip_of};

/// Every record value of the test data that a response must never carry: names and ZIP codes.
fn record_values() -> Vec<String> {
    let mut v: Vec<String> = (0..PATIENTS).map(|p| format!("Patient {p}")).collect();
    let zips: BTreeSet<String> = (0..PATIENTS).map(zip_of).collect();
    v.extend(zips);
    v
}

fn assert_clean(what: &str, text: &str) {
    for v in record_values() {
        assert!(
            !text.contains(&v),
            "{what} carries the record value {v:?}: {text}"
        );
    }
}

/// Every receipt on the ledger.
fn receipts(w: &World) -> Vec<(u64, ledger::entry::QueryReceipt)> {
    (0..w.ledger.size())
        .filter_map(|i| match w.ledger.entry(i).unwrap().entry.body {
            Body::QueryReceipt(r) => Some((i, r)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_queries_leak_no_record_value_anywhere() {
    let w = World::ready(50.0).await;
    let alice = key("alice");
    let attacks = [
        // Expressions above the aggregate reading the tables.
        "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex \
         ORDER BY (SELECT MAX(name) FROM visits WHERE patient_id = 1199)",
        "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex \
         HAVING (SELECT COUNT(*) FROM visits WHERE name = 'Patient 3') > 0",
        "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex \
         LIMIT (SELECT COUNT(*) FROM visits WHERE zip = '10001')",
        // Failures whose text carried raw values.
        "SELECT COUNT(*) FROM visits WHERE CAST(zip || sex AS INT) > 0",
        "SELECT COUNT(*) FROM visits WHERE CAST(concat(zip, '-', sex) AS DATE) IS NULL",
        "SELECT COUNT(*) FROM visits WHERE to_timestamp(zip) IS NULL",
        "SELECT COUNT(*) FROM visits WHERE 1 / (CAST(zip AS BIGINT) - 10001) > 0",
        "SELECT COUNT(*) FROM visits WHERE regexp_like(zip, '^1')",
        "SELECT COUNT(*) FROM visits WHERE repeat(zip, 100000) = ''",
        "SELECT COUNT(*) FROM visits WHERE CAST(name AS INT) > 0",
        // Grouping sets, window functions, odd shapes.
        "SELECT sex, zip, COUNT(*) FROM visits GROUP BY ROLLUP (sex, zip)",
        "SELECT sex, zip, COUNT(*) FROM visits GROUP BY CUBE (sex, zip)",
        "SELECT COUNT(*) OVER () FROM visits",
        "SELECT sex, CAST(COUNT(*) AS VARCHAR) || sex AS t FROM visits GROUP BY sex",
    ];
    for sql in attacks {
        let r = w
            .run(&alice, World::dp("s1", sql, 0.1).into_with_delta(1e-7))
            .await;
        match r {
            Ok((h, batches)) => {
                // Released: only noisy aggregates, never a record value.
                for b in &batches {
                    assert_clean(sql, &format!("{b:?}"));
                }
                assert!(h.epsilon_spent > 0.0 || h.repeated, "{sql}");
            }
            Err(s) => {
                assert_clean(sql, s.message());
                assert_ne!(s.code(), Code::Unknown, "{sql}: {s:?}");
            }
        }
    }
    // Deep and oversized queries are refused before planning, with a receipt.
    let ors = (0..1200)
        .map(|i| format!("hba1c = {i}"))
        .collect::<Vec<_>>()
        .join(" OR ");
    let e = w
        .run(
            &alice,
            World::dp(
                "s1",
                &format!("SELECT COUNT(*) FROM visits WHERE {ors}"),
                0.1,
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    World::receipt_of(&e);

    // Nothing on the ledger carries a record value: every receipt's reason and mechanism.
    let all = receipts(&w);
    assert!(all.len() > 10);
    for (i, r) in &all {
        if let Some(reason) = &r.reason {
            assert_clean(&format!("receipt {i}"), reason);
        }
        assert_clean(
            &format!("receipt {i}"),
            &serde_json::to_string(&r.mechanism).unwrap(),
        );
    }
    // The broker still answers.
    w.run(&alice, World::dp("s1", "SELECT COUNT(*) FROM visits", 0.1))
        .await
        .unwrap();
}

trait WithDelta {
    fn into_with_delta(self, delta: f64) -> Self;
}
impl WithDelta for proto::v1::QueryRequest {
    fn into_with_delta(mut self, delta: f64) -> Self {
        self.delta = delta;
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_expression_is_no_oracle_for_consented_or_other_patients() {
    // The oracle: "does some row hold hba1c = v?" by an expression that failed on that row.
    // Probe values held by consented patients, by non-consented ones only, and by none: the
    // answers must not tell them apart (here: every probe is answered, with its receipt).
    let w = World::ready(1000.0).await;
    let alice = key("alice");
    let value = |p: i64, v: i64| ((p * 7 + v * 3) % 80) + 50; // hba1c * 10, as in world.rs
    let consented: BTreeSet<i64> = (0..CONSENTED)
        .flat_map(|p| [value(p, 0), value(p, 1)])
        .collect();
    let everyone: BTreeSet<i64> = (0..PATIENTS)
        .flat_map(|p| [value(p, 0), value(p, 1)])
        .collect();
    let mut probes: Vec<(i64, &str)> = Vec::new();
    for t in [value(0, 0), value(3, 1)] {
        probes.push((t, "consented"));
    }
    if let Some(t) = everyone.difference(&consented).next() {
        probes.push((*t, "not consented"));
    }
    probes.push((999, "absent"));
    let mut outcomes = BTreeSet::new();
    for (t, kind) in &probes {
        for sql in [
            format!("SELECT COUNT(*) FROM visits WHERE 1 / (CAST(hba1c * 10 AS BIGINT) - {t}) > 0"),
            format!(
                "SELECT COUNT(*) FROM visits WHERE CAST(CASE WHEN CAST(hba1c * 10 AS BIGINT) \
                 = {t} THEN 'x' ELSE '1' END AS INT) = 1"
            ),
            // A date past the calendar, made by a cast, then stepped or printed.
            format!(
                "SELECT COUNT(*) FROM visits WHERE (CASE WHEN CAST(hba1c * 10 AS BIGINT) = {t} \
                 THEN CAST(CAST(2000000000 + character_length(zip) AS INT) AS DATE) \
                 + INTERVAL '1 day' ELSE CAST('2020-01-01' AS DATE) END) IS NOT NULL"
            ),
            format!(
                "SELECT COUNT(*) FROM visits WHERE (CASE WHEN CAST(hba1c * 10 AS BIGINT) = {t} \
                 THEN CAST(CAST(CAST(2000000000 + character_length(zip) AS INT) AS DATE) AS \
                 VARCHAR) ELSE 'a' END) IS NOT NULL"
            ),
            // A date past the calendar, printed by a function.
            format!(
                "SELECT COUNT(*) FROM visits WHERE length(to_char(CAST(CAST(CASE WHEN \
                 CAST(hba1c * 10 AS BIGINT) = {t} THEN 2147483000 ELSE 18000 END AS INT) AS DATE), \
                 '%Y-%m-%d %A')) >= 0"
            ),
            // A position at the end of the integers.
            format!(
                "SELECT COUNT(*) FROM visits WHERE length(substr(zip, CASE WHEN \
                 CAST(hba1c * 10 AS BIGINT) = {t} THEN -9223372036854775807 - 1 ELSE 1 END, 1)) \
                 >= 0"
            ),
        ] {
            let r = w.run(&alice, World::dp("s1", &sql, 0.5)).await;
            let code = r.as_ref().err().map(|s| s.code());
            outcomes.insert(format!("{code:?}"));
            assert!(r.is_ok(), "{kind} {t}: {:?}", r.err());
        }
    }
    assert_eq!(
        outcomes.len(),
        1,
        "the probes' outcomes differ: {outcomes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_answer_after_the_draw_is_released_and_charged() {
    let w = World::ready(2.0).await;
    let alice = key("alice");
    let (h, batches) = w
        .run(
            &alice,
            World::dp(
                "s1",
                "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex HAVING COUNT(*) > 100000",
                0.5,
            ),
        )
        .await
        .unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 0);
    assert_eq!(w.ledger.state().spent("s1", "visits").epsilon, 0.5);
    assert_eq!(w.receipt(h.receipt_index).outcome, Outcome::Released);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_queries_in_flight_are_charged_once() {
    let w = World::ready(2.0).await;
    let sql = "SELECT sex, AVG(hba1c) AS m FROM visits GROUP BY sex";
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let req = World::dp("s1", sql, 0.5);
        let mut q = w.query(&key("alice"));
        tasks.push(tokio::spawn(async move {
            let s = q.run(req).await.unwrap().into_inner();
            broker::client::collect_query(s).await.unwrap().0
        }));
    }
    let mut digests = BTreeSet::new();
    let mut fresh = 0;
    for t in tasks {
        let h = t.await.unwrap();
        digests.insert(h.result_digest);
        fresh += usize::from(!h.repeated);
    }
    assert_eq!(fresh, 1, "one draw, seven repeats");
    assert_eq!(digests.len(), 1);
    assert_eq!(w.ledger.state().spent("s1", "visits").epsilon, 0.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn patient_registrations_are_read_by_the_patient_and_the_operator_only() {
    let w = World::ready(1.0).await;
    let index = (0..w.ledger.size())
        .find(|&i| {
            matches!(&w.ledger.entry(i).unwrap().entry.body,
                Body::PrincipalRegistered(p) if p.id.as_str() == "p1000")
        })
        .unwrap();
    let get = |who: &str| {
        let mut c = w.ledger_client(&key(who));
        async move {
            c.get_entry(proto::v1::GetEntryRequest { index })
                .await
                .map(|r| r.into_inner().leaf)
        }
    };
    for who in ["alice", "irb", "pharma", "hospital", "p1001"] {
        let e = get(who).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{who}");
    }
    assert_eq!(get("p1000").await.unwrap(), w.ledger.leaf(index).unwrap());
    let mut op = w.ledger_client(&w.operator);
    op.get_entry(proto::v1::GetEntryRequest { index })
        .await
        .unwrap();
    // Researchers' and IRBs' registrations stay public within the broker.
    let alice_index = (0..w.ledger.size())
        .find(|&i| {
            matches!(&w.ledger.entry(i).unwrap().entry.body,
                Body::PrincipalRegistered(p) if p.id.as_str() == "alice")
        })
        .unwrap();
    let mut c = w.ledger_client(&key("pharma"));
    c.get_entry(proto::v1::GetEntryRequest { index: alice_index })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_extracts_cannot_be_differenced_or_joined_on_their_pseudonyms() {
    use arrow::array::AsArray;
    let w = World::ready(1.0).await;
    w.extract_study("x1").await;
    w.extract_study("x2").await;
    let alice = key("alice");
    let pseudonyms = |batches: &[arrow::array::RecordBatch]| -> BTreeSet<String> {
        batches
            .iter()
            .flat_map(|b| {
                b.column_by_name("patient_id")
                    .unwrap()
                    .as_string::<i32>()
                    .iter()
                    .flatten()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let first = "SELECT patient_id, zip FROM visits";
    let (h1, a) = w.run(&alice, World::extract("x1", first)).await.unwrap();
    // Within a study, another extract of the dataset would difference with the first: the
    // rows one cohort has and the other lacks (another WHERE), or the values a CASE nulls
    // for some patients, are those patients' rows. Refused before anything runs, receipted.
    let receipts = w.ledger.state().receipts_of_study("x1").len();
    for sql in [
        "SELECT patient_id, zip FROM visits WHERE sex = 'F'",
        "SELECT patient_id, CASE WHEN sex = 'F' THEN NULL ELSE zip END AS zip FROM visits",
        "SELECT patient_id, hba1c FROM visits",
        "SELECT zip FROM visits LIMIT 41",
    ] {
        let e = w.run(&alice, World::extract("x1", sql)).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{sql}: {e:?}");
        assert!(e.message().contains("one extract"), "{sql}: {e:?}");
    }
    assert_eq!(
        w.ledger.state().receipts_of_study("x1").len(),
        receipts + 4,
        "every refusal receipted"
    );
    // Ground truth: repeating the study's extract gives the same rows, so nothing is learned
    // by asking again.
    let (_, again) = w.run(&alice, World::extract("x1", first)).await.unwrap();
    assert_eq!(pseudonyms(&a), pseudonyms(&again));
    let rows = |bs: &[arrow::array::RecordBatch]| bs.iter().map(|b| b.num_rows()).sum::<usize>();
    assert_eq!(rows(&a), rows(&again));
    // A consent granted since: the repeat would hold the new patient's rows too, and the
    // difference of the two copies would be those rows. Refused, receipted, nothing released;
    // then, with that consent revoked (the snapshot of the first extract again), repeated.
    let hospital = key("hospital");
    let mut c = w.consent(&hospital);
    let grant = crate::world::body(
        "consent_granted",
        serde_json::json!({
            "consent_id": "late", "subject": "1190", "scope": {"custodian": "hospital"},
            "purposes": ["GRU"], "valid_from": "2020-01-01T00:00:00Z", "grantor": "hospital",
        }),
    );
    c.grant(broker::client::sign(&hospital, grant).unwrap())
        .await
        .unwrap();
    let before = w.ledger.state().receipts_of_study("x1").len();
    let e = w
        .run(&alice, World::extract("x1", first))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("one snapshot"), "{e:?}");
    assert_eq!(w.ledger.state().receipts_of_study("x1").len(), before + 1);
    let denied = w.receipt(World::receipt_of(&e));
    assert_eq!(denied.outcome, Outcome::Denied);
    assert!(denied.result_digest.is_none(), "nothing released");
    let revoke = crate::world::body(
        "consent_revoked",
        serde_json::json!({"subject": "1190", "consent_id": "late", "grantor": "hospital"}),
    );
    c.revoke(broker::client::sign(&hospital, revoke).unwrap())
        .await
        .unwrap();
    let (_, third) = w.run(&alice, World::extract("x1", first)).await.unwrap();
    assert_eq!(pseudonyms(&a), pseudonyms(&third));
    // Another study's extract shares no pseudonym with the first.
    let (_, b) = w
        .run(
            &alice,
            World::extract("x2", "SELECT patient_id, hba1c FROM visits"),
        )
        .await
        .unwrap();
    let (pa, pb) = (pseudonyms(&a), pseudonyms(&b));
    assert!(!pa.is_empty() && !pb.is_empty());
    assert_eq!(pa.intersection(&pb).count(), 0, "the extracts link");
    // LIMIT differencing (rows n and n + 1 of the table's order) is refused outright.
    w.extract_study("x3").await;
    for sql in [
        "SELECT zip FROM visits LIMIT 41",
        "SELECT sex FROM visits LIMIT 1 OFFSET 40",
    ] {
        let e = w.run(&alice, World::extract("x3", sql)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{sql}: {e:?}");
    }
    // Public columns count as quasi-identifiers.
    let (h3, _) = w
        .run(
            &alice,
            World::extract("x3", "SELECT patient_id, zip, sex FROM visits"),
        )
        .await
        .unwrap();
    assert_eq!(
        w.receipt(h3.receipt_index).mechanism["quasi_identifiers"],
        serde_json::json!(["zip", "sex"])
    );
    assert_eq!(
        w.receipt(h1.receipt_index).mechanism["quasi_identifiers"],
        serde_json::json!(["zip"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_query_is_free_and_no_date_step_can_fail() {
    let w = World::ready(1.0).await;
    let alice = key("alice");
    // A vanishing epsilon would make every probe free: refused before anything runs.
    for eps in [1e-300, 5e-324, 1e-13, 9.99e-4] {
        let e = w
            .run(&alice, World::dp("s1", "SELECT COUNT(*) FROM visits", eps))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{eps}: {e:?}");
    }
    // A date step that could leave the range of dates failed on the rows a CASE let through:
    // refused when planned, whatever the rows.
    for t in ["5.0", "13.9", "99"] {
        let sql = format!(
            "SELECT COUNT(*) FROM visits WHERE (CASE WHEN hba1c > {t} THEN \
             CAST('2020-01-01' AS DATE) + INTERVAL '300000 years' ELSE CAST('2020-01-01' AS DATE) \
             END) > CAST('1800-01-01' AS DATE)"
        );
        let e = w.run(&alice, World::dp("s1", &sql, 0.1)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{t}: {e:?}");
    }
    assert_eq!(w.ledger.state().spent("s1", "visits").epsilon, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_column_extracts_cannot_be_zipped_back_into_rows() {
    use arrow::array::AsArray;
    let w = World::ready(1.0).await;
    w.extract_study("x1").await;
    w.extract_study("x2").await;
    let alice = key("alice");
    let column = |batches: &[arrow::array::RecordBatch]| -> Vec<String> {
        batches
            .iter()
            .flat_map(|b| {
                let c =
                    arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
                c.as_string::<i32>()
                    .iter()
                    .map(|v| v.unwrap_or("").to_owned())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let (_, a) = w
        .run(&alice, World::extract("x1", "SELECT sex FROM visits"))
        .await
        .unwrap();
    let (_, b) = w
        .run(&alice, World::extract("x2", "SELECT hba1c FROM visits"))
        .await
        .unwrap();
    let (sexes, values) = (column(&a), column(&b));
    assert_eq!(
        (sexes.len(), values.len()),
        (300, 300),
        "nothing suppressed"
    );
    // Released in the order of their values, not the table's.
    assert!(sexes.windows(2).all(|p| p[0] <= p[1]));
    // Ground truth: the (sex, hba1c) of every consented visit. Zipped by position, the two
    // extracts must not give those rows back.
    let mut truth: Vec<(String, String)> = Vec::new();
    for p in 0..CONSENTED {
        for v in 0..2 {
            let sex = if p % 2 == 0 { "F" } else { "M" };
            let h = 5.0 + ((p * 7 + v * 3) % 80) as f64 / 10.0;
            // As the extract's column is read back: Arrow's text form of the value.
            let h = column(&[arrow::array::RecordBatch::try_from_iter(vec![(
                "h",
                std::sync::Arc::new(arrow::array::Float64Array::from(vec![h]))
                    as arrow::array::ArrayRef,
            )])
            .unwrap()]);
            truth.push((sex.to_string(), h[0].clone()));
        }
    }
    let mut released: Vec<String> = truth.iter().map(|t| t.1.clone()).collect();
    let mut got = values.clone();
    released.sort();
    got.sort();
    assert_eq!(released, got, "the same values, read back alike");
    let mut zipped: Vec<(String, String)> = sexes.into_iter().zip(values).collect();
    truth.sort();
    zipped.sort();
    let same = truth.iter().zip(&zipped).filter(|(t, z)| t == z).count();
    assert!(
        same < truth.len() / 2,
        "{same} of {} rows rebuilt",
        truth.len()
    );
}

/// A codec that sends raw bytes as a request and ignores any answer's body: a stock client
/// that got the message wrong (or an attacker's fuzzer).
mod raw {
    use prost::bytes::{Buf, BufMut};
    use tonic::Status;
    use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    #[derive(Default)]
    pub struct Raw;
    pub struct Enc;
    pub struct Dec;

    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = ();
        type Encoder = Enc;
        type Decoder = Dec;
        fn encoder(&mut self) -> Enc {
            Enc
        }
        fn decoder(&mut self) -> Dec {
            Dec
        }
    }
    impl Encoder for Enc {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.put_slice(&item);
            Ok(())
        }
        fn buffer_settings(&self) -> BufferSettings {
            BufferSettings::default()
        }
    }
    impl Decoder for Dec {
        type Item = ();
        type Error = Status;
        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
            let n = buf.remaining();
            buf.advance(n);
            Ok(Some(()))
        }
        fn buffer_settings(&self) -> BufferSettings {
            BufferSettings::default()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_the_senders_error_and_change_nothing() {
    let w = World::ready(5.0).await;
    let size = w.ledger.size();
    let garbage: [&[u8]; 4] = [
        &[0xff, 0xff, 0xff, 0xff],
        // A length-delimited field whose length runs past the message.
        &[0x0a, 0x40, 0x01, 0x02],
        // A varint that never ends.
        &[
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ],
        // Invalid UTF-8 in a string field.
        &[0x0a, 0x02, 0xc3, 0x28],
    ];
    for (who, path) in [
        ("alice", "/consentry.v1.Query/Run"),
        ("hospital", "/consentry.v1.Consent/Grant"),
        ("operator", "/consentry.v1.Registry/Append"),
        ("irb", "/consentry.v1.Audit/Receipts"),
    ] {
        let k = if who == "operator" {
            crate::world::clone_key(&w.operator)
        } else {
            key(who)
        };
        let channel = tonic::service::interceptor::InterceptedService::new(
            w.channel(),
            broker::client::Bearer::new(k),
        );
        for bytes in garbage {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await.unwrap();
            let status = if path.ends_with("/Run") {
                grpc.server_streaming(
                    tonic::Request::new(bytes.to_vec()),
                    path.parse().unwrap(),
                    raw::Raw,
                )
                .await
                .map(|_| ())
            } else {
                grpc.unary(
                    tonic::Request::new(bytes.to_vec()),
                    path.parse().unwrap(),
                    raw::Raw,
                )
                .await
                .map(|_| ())
            }
            .expect_err(path);
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{path} {bytes:?}: {status:?}"
            );
            assert!(status.message().len() < 200, "{status:?}");
        }
    }
    assert_eq!(w.ledger.size(), size, "nothing written");
}

/// What a header and a receipt say of the consent snapshot cannot be tested against guessed
/// ids: it is neither the snapshot's digest (a function of the consented ids alone) nor the
/// digest of that set less one subject, yet the same snapshot gives the same value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_consent_snapshot_cannot_be_tested_against_guessed_ids() {
    let w = World::ready(50.0).await;
    let alice = key("alice");
    let sql = "SELECT COUNT(*) AS n FROM visits";
    let (h, _) = w.run(&alice, World::dp("s1", sql, 0.5)).await.unwrap();
    // Ground truth: the snapshot the query used, and what a researcher could compute.
    let filter = w
        .ledger
        .state()
        .consent_filter("visits", "s1", ledger::ids::Timestamp::now())
        .unwrap();
    let guesses: Vec<String> = std::iter::once(filter.digest().to_string())
        .chain(filter.ids().iter().map(|left_out| {
            let rest: Vec<&ledger::ids::SubjectId> =
                filter.ids().iter().filter(|i| *i != left_out).collect();
            let mut text = String::from("include\n");
            for id in rest {
                text.push_str(id.as_str());
                text.push('\n');
            }
            ledger::ids::Digest::of(text.as_bytes()).to_string()
        }))
        .collect();
    assert_eq!(filter.ids().len() as i64, CONSENTED);
    assert_eq!(filter.basis(), ledger::state::Basis::Include);
    assert!(
        !guesses.contains(&h.consent_digest),
        "the header's value is testable"
    );
    let r = w.receipt(h.receipt_index);
    assert_eq!(r.consent_digest.unwrap().to_string(), h.consent_digest);
    // The same snapshot, another query: the same value (a receipt still ties to its snapshot).
    let (h2, _) = w
        .run(
            &alice,
            World::dp("s1", "SELECT COUNT(*) AS m FROM visits", 0.5),
        )
        .await
        .unwrap();
    assert_eq!(h2.consent_digest, h.consent_digest);
}
