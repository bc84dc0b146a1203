//! A researcher's existing tools: Arrow Flight SQL on the broker's port, with the study in a
//! call header and the same bearer token, through the same query path and receipts.

use arrow::array::{Array as _, RecordBatch, StringArray};
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{
    CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTables, CommandStatementQuery,
    ProstMessageExt as _, SqlInfo,
};
use arrow_flight::{FlightDescriptor, FlightInfo, Ticket};
use futures::TryStreamExt as _;
use ledger::note::SignerKey;
use prost::Message as _;
use tonic::Code;
use tonic::metadata::MetadataValue;

use crate::world::{World, key};

struct Researcher {
    client: FlightServiceClient<tonic::transport::Channel>,
    key: SignerKey,
    headers: Vec<(&'static str, String)>,
}

impl Researcher {
    fn new(w: &World, who: &str, headers: &[(&'static str, &str)]) -> Researcher {
        Researcher {
            client: FlightServiceClient::new(w.channel()),
            key: key(who),
            headers: headers.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        }
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        let token = broker::auth::mint(&self.key, std::time::Duration::from_secs(60)).unwrap();
        let md = req.metadata_mut();
        md.insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
        );
        for (k, v) in &self.headers {
            md.insert(*k, MetadataValue::try_from(v.as_str()).unwrap());
        }
        req
    }

    async fn info(&mut self, cmd: Vec<u8>) -> Result<FlightInfo, tonic::Status> {
        let req = self.request(FlightDescriptor::new_cmd(cmd));
        Ok(self.client.get_flight_info(req).await?.into_inner())
    }

    async fn statement(&mut self, sql: &str) -> Result<FlightInfo, tonic::Status> {
        let cmd = CommandStatementQuery {
            query: sql.into(),
            transaction_id: None,
        };
        self.info(cmd.as_any().encode_to_vec()).await
    }

    async fn fetch(&mut self, ticket: &Ticket) -> Result<Vec<RecordBatch>, tonic::Status> {
        let req = self.request(ticket.clone());
        let stream = self.client.do_get(req).await?.into_inner();
        let batches = FlightRecordBatchStream::new_from_flight_data(
            stream.map_err(|s| FlightError::Tonic(Box::new(s))),
        )
        .try_collect::<Vec<_>>()
        .await
        .map_err(tonic::Status::from)?;
        Ok(batches)
    }
}

fn ticket(info: &FlightInfo) -> Ticket {
    assert_eq!(info.endpoint.len(), 1);
    info.endpoint[0].ticket.clone().unwrap()
}

fn strings(b: &RecordBatch, col: &str) -> Vec<String> {
    let a = b
        .column_by_name(col)
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    (0..a.len()).map(|i| a.value(i).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_is_released_through_the_query_path_with_its_receipt() {
    let w = World::ready(5.0).await;
    let mut alice = Researcher::new(
        &w,
        "alice",
        &[("x-consentry-study", "s1"), ("x-consentry-epsilon", "0.5")],
    );
    let sql = "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex ORDER BY sex";
    let info = alice.statement(sql).await.unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&info.app_metadata).unwrap();
    assert_eq!(meta["epsilon_spent"], 0.5);
    assert_eq!(meta["budget"]["epsilon_left"], 4.5);
    let index = meta["receipt_index"].as_u64().unwrap();
    let receipt = w.receipt(index);
    assert_eq!(receipt.outcome, ledger::entry::Outcome::Released);
    assert_eq!(receipt.researcher.as_str(), "alice");
    assert_eq!(receipt.epsilon, 0.5);

    let schema = info.clone().try_decode_schema().unwrap();
    let batches = alice.fetch(&ticket(&info)).await.unwrap();
    assert_eq!(batches[0].schema().fields().len(), schema.fields().len());
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(rows, 2, "both keys of the public domain F, M");
    assert_eq!(strings(&batches[0], "sex"), ["F", "M"]);

    // A ticket is fetched once, by its own caller.
    let again = alice.fetch(&ticket(&info)).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "{again:?}");
    let info = alice.statement(sql).await.unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&info.app_metadata).unwrap();
    assert_eq!(meta["repeated"], true, "an identical repeat");
    assert_eq!(meta["budget"]["epsilon_left"], 4.5, "is free");
    let mut bob = Researcher::new(&w, "bob", &[("x-consentry-study", "s1")]);
    let stolen = bob.fetch(&ticket(&info)).await.unwrap_err();
    assert_eq!(stolen.code(), Code::NotFound, "{stolen:?}");
    assert_eq!(alice.fetch(&ticket(&info)).await.unwrap().len(), 1);

    // The default epsilon when the header is absent.
    let mut plain = Researcher::new(&w, "alice", &[("x-consentry-study", "s1")]);
    let info = plain
        .statement("SELECT COUNT(*) FROM visits WHERE hba1c > 7")
        .await
        .unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&info.app_metadata).unwrap();
    assert_eq!(
        meta["epsilon_spent"],
        broker::server::flight::DEFAULT_EPSILON
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_arrive_as_flight_errors_with_their_codes_and_receipts() {
    let w = World::ready(1.0).await;
    let mut alice = Researcher::new(&w, "alice", &[("x-consentry-study", "s1")]);

    let e = alice.statement("SELECT * FROM visits").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("it would release rows"), "{e:?}");
    let r = w.receipt(World::receipt_of(&e));
    assert_eq!(r.outcome, ledger::entry::Outcome::Denied);

    let e = alice
        .statement("SELECT name FROM visits GROUP BY name")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let mut over = Researcher::new(
        &w,
        "alice",
        &[("x-consentry-study", "s1"), ("x-consentry-epsilon", "2")],
    );
    let e = over
        .statement("SELECT COUNT(*) FROM visits")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    let mut nostudy = Researcher::new(&w, "alice", &[]);
    let e = nostudy
        .statement("SELECT COUNT(*) FROM visits")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("x-consentry-study"), "{e:?}");

    let mut bob = Researcher::new(&w, "bob", &[("x-consentry-study", "s1")]);
    let e = bob
        .statement("SELECT COUNT(*) FROM visits")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    let mut bad = Researcher::new(
        &w,
        "alice",
        &[("x-consentry-study", "s1"), ("x-consentry-epsilon", "lots")],
    );
    let e = bad
        .statement("SELECT COUNT(*) FROM visits")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // No token: unauthenticated, before anything runs.
    let mut anon = FlightServiceClient::new(w.channel());
    let cmd = CommandStatementQuery {
        query: "SELECT COUNT(*) FROM visits".into(),
        transaction_id: None,
    };
    let e = anon
        .get_flight_info(FlightDescriptor::new_cmd(cmd.as_any().encode_to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // Transactions (and statements that would change data) are not Flight SQL's business here.
    let begin = arrow_flight::sql::ActionBeginTransactionRequest {};
    let req = alice.request(arrow_flight::Action::new(
        "BeginTransaction",
        begin.as_any().encode_to_vec(),
    ));
    let e = alice.client.do_action(req).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn catalog_calls_list_only_what_the_callers_studies_may_query() {
    let w = World::ready(1.0).await;
    let mut alice = Researcher::new(&w, "alice", &[]);
    let cmd = CommandGetTables {
        catalog: None,
        db_schema_filter_pattern: None,
        table_name_filter_pattern: None,
        table_types: vec![],
        include_schema: true,
    };
    let info = alice.info(cmd.as_any().encode_to_vec()).await.unwrap();
    let tables = alice.fetch(&ticket(&info)).await.unwrap();
    assert_eq!(strings(&tables[0], "table_name"), ["visits"]);
    assert_eq!(strings(&tables[0], "catalog_name"), ["visits"]);
    let bytes = tables[0]
        .column_by_name("table_schema")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::BinaryArray>()
        .unwrap()
        .value(0)
        .to_vec();
    let schema = arrow::ipc::convert::try_schema_from_ipc_buffer(&bytes).unwrap();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert!(
        names.contains(&"hba1c") && names.contains(&"patient_id"),
        "{names:?}"
    );
    assert!(
        !names.contains(&"name"),
        "a direct identifier is never listed"
    );
    // Each column says its policy, and the table its contribution limits (the policy's).
    let policy_of = |column: &str| -> serde_json::Value {
        let f = schema.field_with_name(column).unwrap();
        serde_json::from_str(&f.metadata()["consentry.policy"]).unwrap()
    };
    assert_eq!(
        policy_of("hba1c"),
        serde_json::json!({"class": "sensitive", "bounds": [4.0, 14.0]})
    );
    assert_eq!(
        policy_of("sex"),
        serde_json::json!({"class": "public", "domain": ["F", "M"]})
    );
    assert_eq!(policy_of("patient_id")["class"], "privacy_unit");
    let limits: serde_json::Value =
        serde_json::from_str(&schema.metadata()["consentry.policy"]).unwrap();
    assert_eq!(limits["max_rows_per_unit"], 5);

    let schemas = CommandGetDbSchemas {
        catalog: None,
        db_schema_filter_pattern: None,
    };
    let info = alice.info(schemas.as_any().encode_to_vec()).await.unwrap();
    let rows = alice.fetch(&ticket(&info)).await.unwrap();
    assert_eq!(strings(&rows[0], "db_schema_name"), ["public"]);

    // bob belongs to no study: nothing to list.
    let mut bob = Researcher::new(&w, "bob", &[]);
    let info = bob.info(cmd.as_any().encode_to_vec()).await.unwrap();
    let rows: usize = bob
        .fetch(&ticket(&info))
        .await
        .unwrap()
        .iter()
        .map(RecordBatch::num_rows)
        .sum();
    assert_eq!(rows, 0);

    let sql_info = CommandGetSqlInfo {
        info: vec![SqlInfo::FlightSqlServerName as u32],
    };
    let info = alice.info(sql_info.as_any().encode_to_vec()).await.unwrap();
    let rows = alice.fetch(&ticket(&info)).await.unwrap();
    assert_eq!(rows[0].num_rows(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_cannot_fill_the_result_map_and_is_refused_before_being_charged() {
    let w = World::ready(50.0).await;
    let mut alice = Researcher::new(
        &w,
        "alice",
        &[("x-consentry-study", "s1"), ("x-consentry-epsilon", "0.1")],
    );
    let mut infos = Vec::new();
    for i in 0..16 {
        let sql = format!("SELECT COUNT(*) AS n FROM visits WHERE hba1c > {i}");
        infos.push(alice.statement(&sql).await.unwrap());
    }
    // The 17th waiting result is refused before it runs: nothing receipted, nothing charged.
    let (size, spent) = (w.ledger.size(), w.ledger.state().spent("s1", "visits"));
    let e = alice
        .statement("SELECT COUNT(*) AS n FROM visits WHERE hba1c > 100")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(w.ledger.size(), size);
    assert_eq!(w.ledger.state().spent("s1", "visits"), spent);
    // Free repeats do not get around it either.
    let e = alice
        .statement("SELECT COUNT(*) AS n FROM visits WHERE hba1c > 0")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    // Another caller is not affected; fetching frees a slot.
    w.register_study("s2", "bob", "pharma").await;
    w.approve("s2", "irb", 1.0, 0.0).await;
    let mut bob = Researcher::new(&w, "bob", &[("x-consentry-study", "s2")]);
    bob.statement("SELECT COUNT(*) AS n FROM visits")
        .await
        .unwrap();
    alice.fetch(&ticket(&infos[0])).await.unwrap();
    alice
        .statement("SELECT COUNT(*) AS n FROM visits WHERE hba1c > 100")
        .await
        .unwrap();
}

/// JDBC (and so DBeaver, Tableau and most BI tools) prepares every statement, even a plain
/// `executeQuery`: a stock Flight SQL client's prepare, execute and close go through the same
/// query path, receipt and budget as a plain statement.
#[tokio::test(flavor = "multi_thread")]
async fn prepared_statements_run_as_statements_through_the_query_path() {
    use arrow_flight::sql::client::FlightSqlServiceClient;
    let w = World::ready(5.0).await;
    let mut client = FlightSqlServiceClient::new(w.channel());
    let token = broker::auth::mint(&key("alice"), std::time::Duration::from_secs(60)).unwrap();
    client.set_token(token);
    client.set_header("x-consentry-study", "s1");
    client.set_header("x-consentry-epsilon", "0.25");
    let sql = "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex ORDER BY sex";
    let size = w.ledger.size();
    let mut ps = client.prepare(sql.into(), None).await.unwrap();
    assert_eq!(
        w.ledger.size(),
        size,
        "preparing runs nothing, writes nothing"
    );
    let info = ps.execute().await.unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&info.app_metadata).unwrap();
    assert_eq!(meta["epsilon_spent"], 0.25);
    let receipt = w.receipt(meta["receipt_index"].as_u64().unwrap());
    assert_eq!(receipt.outcome, ledger::entry::Outcome::Released);
    assert_eq!(receipt.epsilon, 0.25);
    let stream = client.do_get(ticket(&info).clone()).await.unwrap();
    let batches: Vec<RecordBatch> = stream.try_collect().await.unwrap();
    assert_eq!(strings(&batches[0], "sex"), ["F", "M"]);
    // Executed again, it is an identical repeat: free, the same answer.
    let again = ps.execute().await.unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&again.app_metadata).unwrap();
    assert_eq!(meta["repeated"], true);
    assert_eq!(meta["budget"]["epsilon_left"], 4.75);
    ps.close().await.unwrap();

    // A refused statement is refused when executed, with its code and receipt, as a plain one.
    let mut bad = client
        .prepare("SELECT name FROM visits".into(), None)
        .await
        .unwrap();
    let refused = tonic::Status::from(bad.execute().await.unwrap_err());
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    // A handle that is not the broker's, and parameters, are refused; nothing was charged.
    let forged = arrow_flight::sql::CommandPreparedStatementQuery {
        prepared_statement_handle: b"SELECT name FROM visits".to_vec().into(),
    };
    let mut alice = Researcher::new(&w, "alice", &[("x-consentry-study", "s1")]);
    let err = alice
        .info(forged.as_any().encode_to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let left = w.ledger.state().account("s1", "visits").unwrap();
    assert!((left.epsilon_left() - 4.75).abs() < 1e-9, "{left:?}");
}

/// A dry run through Flight SQL (`x-consentry-dry-run`): a table of each statistic's 95%
/// half-width and the spend in the metadata; nothing is read, spent or receipted, and the
/// half-width is the one the real query is then released with.
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_over_flight_previews_accuracy_and_spends_nothing() {
    let w = World::ready(5.0).await;
    let sql = "SELECT COUNT(*) AS n, AVG(hba1c) AS m FROM visits";
    let mut dry = Researcher::new(
        &w,
        "alice",
        &[
            ("x-consentry-study", "s1"),
            ("x-consentry-epsilon", "0.5"),
            ("x-consentry-dry-run", "true"),
        ],
    );
    let (size, spent) = (w.ledger.size(), w.ledger.state().spent("s1", "visits"));
    let info = dry.statement(sql).await.unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&info.app_metadata).unwrap();
    assert_eq!(meta["dry_run"], true);
    assert_eq!(meta["epsilon"], 0.5);
    assert_eq!(meta["budget"]["epsilon_left"], 5.0);
    let table = dry.fetch(&ticket(&info)).await.unwrap();
    assert_eq!(strings(&table[0], "statistic").len(), 2);
    let ci = table[0]
        .column_by_name("ci95")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::Float64Array>()
        .unwrap()
        .clone();
    assert!(
        ci.is_valid(0) && ci.value(0) > 0.0,
        "the count's half-width is known"
    );
    assert!(ci.is_null(1), "a mean's depends on the group");
    assert_eq!(w.ledger.size(), size, "no receipt");
    assert_eq!(
        w.ledger.state().spent("s1", "visits"),
        spent,
        "nothing spent"
    );
    // The real query is released with that half-width.
    let mut real = Researcher::new(
        &w,
        "alice",
        &[("x-consentry-study", "s1"), ("x-consentry-epsilon", "0.5")],
    );
    let info = real.statement(sql).await.unwrap();
    let released = real.fetch(&ticket(&info)).await.unwrap();
    let n_ci = released[0]
        .column_by_name("n_ci95")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::Float64Array>()
        .unwrap()
        .value(0);
    assert!(
        (n_ci - ci.value(0)).abs() < 1e-9,
        "{n_ci} vs {}",
        ci.value(0)
    );
    // A header that is not a yes or a no is refused.
    let mut bad = Researcher::new(
        &w,
        "alice",
        &[
            ("x-consentry-study", "s1"),
            ("x-consentry-dry-run", "maybe"),
        ],
    );
    let e = bad.statement(sql).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

/// `SELECT 1` and its kin, what BI tools and connection pools send to test a connection, are
/// answered as they are: no table is read, nothing spent or receipted, with or without a
/// study. A statement that reads a table is no probe, however it starts.
#[tokio::test(flavor = "multi_thread")]
async fn health_probes_are_answered_without_the_query_path() {
    let w = World::ready(5.0).await;
    let size = w.ledger.size();
    for headers in [vec![("x-consentry-study", "s1")], vec![]] {
        let mut alice = Researcher::new(&w, "alice", &headers);
        for sql in ["SELECT 1", "select 'ok' AS status"] {
            let info = alice.statement(sql).await.unwrap();
            let meta: serde_json::Value = serde_json::from_slice(&info.app_metadata).unwrap();
            assert_eq!(meta["probe"], true);
            let table = alice.fetch(&ticket(&info)).await.unwrap();
            assert_eq!(table[0].num_rows(), 1, "{sql}");
        }
    }
    assert_eq!(w.ledger.size(), size, "nothing appended");
    assert_eq!(w.ledger.state().spent("s1", "visits").epsilon, 0.0);
    // Not probes: they go the whole way (a refusal with its receipt).
    let mut alice = Researcher::new(&w, "alice", &[("x-consentry-study", "s1")]);
    for sql in [
        "SELECT 1 FROM visits",
        "SELECT 1 WHERE EXISTS (SELECT 1 FROM visits WHERE zip = '10001')",
    ] {
        let e = alice.statement(sql).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{sql}: {e:?}");
    }
    assert_eq!(w.ledger.size(), size + 2, "each refusal receipted");
    // Without a token, no answer at all.
    let cmd = CommandStatementQuery {
        query: "SELECT 1".into(),
        transaction_id: None,
    };
    let e = FlightServiceClient::new(w.channel())
        .get_flight_info(FlightDescriptor::new_cmd(cmd.as_any().encode_to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
}

/// A command or ticket that names a Flight SQL message but does not decode as it is the
/// sender's error (INVALID_ARGUMENT, as on gRPC), never INTERNAL, and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_command_or_ticket_is_the_senders_error() {
    let w = World::ready(5.0).await;
    let size = w.ledger.size();
    let mut alice = Researcher::new(&w, "alice", &[("x-consentry-study", "s1")]);
    let named = |type_name: &str, value: &[u8]| {
        arrow_flight::sql::Any {
            type_url: format!("type.googleapis.com/arrow.flight.protocol.sql.{type_name}"),
            value: value.to_vec().into(),
        }
        .encode_to_vec()
    };
    // A length that runs past the message; invalid UTF-8 in the SQL.
    for value in [&[0x0a, 0x40, 0x01][..], &[0x0a, 0x02, 0xc3, 0x28][..]] {
        let e = alice
            .info(named("CommandStatementQuery", value))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let ticket = Ticket {
            ticket: named("TicketStatementQuery", value).into(),
        };
        let e = alice.fetch(&ticket).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    assert_eq!(w.ledger.size(), size, "nothing appended");
}
