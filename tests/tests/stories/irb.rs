//! The IRB: approves studies and reviews their usage, denied attempts included.

use tonic::Code;

use crate::world::{World, key};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_irb_reviews_released_and_denied_queries() {
    let w = World::ready(1.0).await;
    let alice = key("alice");
    w.run(
        &alice,
        World::dp("s1", "SELECT COUNT(*) AS n FROM visits", 0.25),
    )
    .await
    .unwrap();
    w.run(
        &alice,
        World::dp("s1", "SELECT AVG(hba1c) FROM visits", 0.25),
    )
    .await
    .unwrap();
    let denied = w
        .run(&alice, World::dp("s1", "SELECT * FROM visits", 0.1))
        .await
        .unwrap_err();
    let denied_at = World::receipt_of(&denied);

    let mut irb = w.audit(&key("irb"));
    let all = irb
        .receipts(proto::v1::AuditRequest {
            study: "s1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .receipts;
    assert_eq!(all.len(), 3);
    let d: Vec<_> = all.iter().filter(|r| r.outcome == "denied").collect();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].index, denied_at);
    assert!(d[0].reason.contains("SELECT *"), "{}", d[0].reason);
    // A denial spends nothing and records what it asked for.
    assert_eq!((d[0].epsilon, d[0].epsilon_requested), (0.0, 0.1));
    // A release asked what it spent; none of these is a repeat.
    for r in all.iter().filter(|r| r.outcome == "released") {
        assert_eq!(r.epsilon_requested, r.epsilon);
        assert!(!r.repeated);
    }

    let released = irb
        .receipts(proto::v1::AuditRequest {
            study: "s1".into(),
            outcome: "released".into(),
            researcher: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .receipts;
    assert_eq!(released.len(), 2);

    // Budget burn-down: cumulative epsilon after each released query.
    let pts = irb
        .budget_usage(proto::v1::BudgetUsageRequest { study: "s1".into() })
        .await
        .unwrap()
        .into_inner()
        .points;
    let cum: Vec<f64> = pts.iter().map(|p| p.epsilon_cumulative).collect();
    assert_eq!(cum.len(), 2);
    assert!(
        (cum[0] - 0.25).abs() < 1e-9 && (cum[1] - 0.5).abs() < 1e-9,
        "{cum:?}"
    );
    assert!((pts[0].epsilon_granted - 1.0).abs() < 1e-12);

    // CSV export carries the same rows.
    let mut stream = irb
        .export(proto::v1::ExportRequest {
            filter: Some(proto::v1::AuditRequest {
                study: "s1".into(),
                ..Default::default()
            }),
            format: "csv".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut csv = Vec::new();
    while let Some(c) = stream.message().await.unwrap() {
        csv.extend(c.data);
    }
    let text = String::from_utf8(csv).unwrap();
    assert!(text.starts_with("index,time,study,researcher"), "{text}");
    assert_eq!(text.lines().count(), 4);
    // In Parquet, times are a timestamp column (it was text), and match the ledger's.
    let mut stream = irb
        .export(proto::v1::ExportRequest {
            filter: Some(proto::v1::AuditRequest {
                study: "s1".into(),
                ..Default::default()
            }),
            format: "parquet".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(c) = stream.message().await.unwrap() {
        bytes.extend(c.data);
    }
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        prost::bytes::Bytes::from(bytes),
    )
    .unwrap()
    .build()
    .unwrap();
    let batch = reader.map(Result::unwrap).next().unwrap();
    let times = batch
        .column_by_name("time")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::TimestampSecondArray>()
        .expect("a timestamp column")
        .clone();
    let index = batch
        .column_by_name("index")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::UInt64Array>()
        .unwrap()
        .value(0);
    assert_eq!(
        times.value(0),
        w.ledger.entry(index).unwrap().entry.time.unix()
    );

    // The PI reads the study's own log, denied attempts too (all studies of hers when she
    // names none).
    for study in ["s1", ""] {
        let own = w
            .audit(&alice)
            .receipts(proto::v1::AuditRequest {
                study: study.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .receipts;
        assert_eq!(own.len(), 3, "{study:?}");
        assert_eq!(own.iter().filter(|r| r.outcome == "denied").count(), 1);
    }
    // The log in pages: at most `limit` receipts after the last index of the page before.
    let page = |after_index: u64| {
        let mut irb = w.audit(&key("irb"));
        async move {
            irb.receipts(proto::v1::AuditRequest {
                study: "s1".into(),
                after_index,
                limit: 2,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let first = page(0).await;
    assert_eq!(first.receipts.len(), 2);
    assert_eq!(first.next_after_index, first.receipts[1].index);
    let second = page(first.next_after_index).await;
    assert_eq!(second.receipts.len(), 1);
    assert_eq!(second.next_after_index, 0, "the last page says so");
    let paged: Vec<u64> = first
        .receipts
        .iter()
        .chain(&second.receipts)
        .map(|r| r.index)
        .collect();
    assert_eq!(paged, all.iter().map(|r| r.index).collect::<Vec<_>>());
    let past = page(second.receipts[0].index).await;
    assert!(past.receipts.is_empty() && past.next_after_index == 0);

    // An identical repeat is released again for free, and marked as a repeat.
    w.run(
        &alice,
        World::dp("s1", "SELECT COUNT(*) AS n FROM visits", 0.25),
    )
    .await
    .unwrap();
    let last = irb
        .receipts(proto::v1::AuditRequest {
            study: "s1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .receipts
        .pop()
        .unwrap();
    assert!(last.repeated && last.outcome == "released", "{last:?}");
    assert_eq!(last.epsilon, 0.0);

    // Another IRB, and a researcher outside the study, may not review it.
    for k in [key("irb2"), key("bob")] {
        let e = w
            .audit(&k)
            .receipts(proto::v1::AuditRequest {
                study: "s1".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{}", k.name());
    }
    // Bad filters are refused.
    let e = irb
        .receipts(proto::v1::AuditRequest {
            study: "s1".into(),
            from: "yesterday".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_suspended_study_cannot_query() {
    let w = World::ready(1.0).await;
    let irb = key("irb");
    let b = crate::world::body(
        "study_suspended",
        serde_json::json!({"study": "s1", "reason": "protocol deviation"}),
    );
    w.registry(&irb)
        .append(broker::client::sign(&irb, b).unwrap())
        .await
        .unwrap();
    let e = w
        .run(
            &key("alice"),
            World::dp("s1", "SELECT COUNT(*) FROM visits", 0.1),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(
        w.receipt(World::receipt_of(&e)).outcome,
        ledger::entry::Outcome::Denied
    );
    // Another IRB cannot approve or suspend it.
    let other = key("irb2");
    let b = crate::world::body(
        "study_suspended",
        serde_json::json!({"study": "s1", "reason": "not mine"}),
    );
    let e = w
        .registry(&other)
        .append(broker::client::sign(&other, b).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
}

/// However long the log, one call answers at most a page of 1,000 receipts, and the pages
/// chained by `next_after_index` give the whole log once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_log_is_read_in_pages_of_at_most_a_thousand() {
    use futures::StreamExt;
    let w = World::ready(1.0).await;
    let alice = key("alice");
    // 1,003 refusals, each receipted (refused when planned: quick, and nothing spent).
    let mut refused: Vec<u64> = futures::stream::iter(0..1_003)
        .map(|_| async {
            let e = w
                .run(&alice, World::dp("s1", "SELECT * FROM visits", 0.1))
                .await
                .unwrap_err();
            World::receipt_of(&e)
        })
        .buffer_unordered(16)
        .collect()
        .await;
    refused.sort_unstable();
    let mut irb = w.audit(&key("irb"));
    let (mut pages, mut read) = (Vec::new(), Vec::new());
    let mut after_index = 0;
    loop {
        let page = irb
            .receipts(proto::v1::AuditRequest {
                study: "s1".into(),
                after_index,
                // More than a page asked for: a page given.
                limit: 5_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages.push(page.receipts.len());
        read.extend(page.receipts.iter().map(|r| r.index));
        if page.next_after_index == 0 {
            break;
        }
        assert_eq!(
            Some(page.next_after_index),
            read.last().copied(),
            "a full page goes on after its last receipt"
        );
        after_index = page.next_after_index;
    }
    assert_eq!(pages, vec![1_000, 3]);
    assert_eq!(read, refused, "every receipt once, in the log's order");
}
