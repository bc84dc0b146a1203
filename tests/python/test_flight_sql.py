"""Arrow Flight SQL with researchers' real tools: the ADBC Flight SQL driver and pyarrow.flight."""

import json

import adbc_driver_flightsql.dbapi as flight_sql
import adbc_driver_manager
import pyarrow as pa
import pyarrow.flight as fl
import pytest

STUDY_HEADER = "adbc.flight.sql.rpc.call_header.x-consentry-study"
EPSILON_HEADER = "adbc.flight.sql.rpc.call_header.x-consentry-epsilon"


def connect(demo, principal="alice", study=None, epsilon=None):
    kwargs = {"adbc.flight.sql.authorization_header": f"Bearer {demo.token(principal)}"}
    if study:
        kwargs[STUDY_HEADER] = study
    if epsilon is not None:
        kwargs[EPSILON_HEADER] = str(epsilon)
    return flight_sql.connect(demo.info["flight_url"], db_kwargs=kwargs, autocommit=True)


def test_adbc_runs_a_dp_query_within_the_study(demo):
    study = demo.info["study"]["id"]
    with connect(demo, study=study, epsilon=0.5) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT code, COUNT(*) AS n, AVG(value) AS mean FROM observations "
            "GROUP BY code ORDER BY code"
        )
        table = cur.fetch_arrow_table()
    codes = table.column("code").to_pylist()
    # Every LOINC code of the public domain is released, sorted after noise.
    assert codes == sorted(["4548-4", "2345-7", "2089-1", "8480-6", "39156-5", "33914-3"])
    hba1c = table.to_pylist()[codes.index("4548-4")]
    # Noisy, but within a wide multiple of its own 95% accuracy of the true mean (about 6%).
    assert abs(hba1c["mean"] - 6.0) <= 3 * hba1c["mean_ci95"] + 1.0, hba1c
    assert hba1c["n_ci95"] > 0 and hba1c["mean_ci95"] > 0


def test_adbc_sees_refusals_with_actionable_messages(demo):
    study = demo.info["study"]["id"]
    with connect(demo, study=study) as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.ProgrammingError) as e:
            cur.execute("SELECT * FROM patients")
        assert "it would release rows" in str(e.value)
        with pytest.raises(adbc_driver_manager.ProgrammingError) as e:
            cur.execute("SELECT ssn, COUNT(*) FROM patients GROUP BY ssn")
        assert "ssn" in str(e.value)
    # Without the study header: the message names the header to set.
    with connect(demo) as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.ProgrammingError) as e:
            cur.execute("SELECT COUNT(*) FROM patients")
        assert "x-consentry-study" in str(e.value)
    # bob is not a researcher of the study.
    with connect(demo, principal="bob", study=study) as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.ProgrammingError) as e:
            cur.execute("SELECT COUNT(*) FROM patients")
        assert "not a researcher of study" in str(e.value)


def test_adbc_prepared_statement_runs_through_the_query_path(demo):
    """JDBC and BI tools prepare every statement; ADBC's prepare goes the same way."""
    study = demo.info["study"]["id"]
    sql = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex ORDER BY sex"
    with connect(demo, study=study, epsilon=0.2) as conn, conn.cursor() as cur:
        cur.adbc_prepare(sql)
        cur.execute(sql)
        table = cur.fetch_arrow_table()
    assert table.column("sex").to_pylist() == ["F", "M"]
    assert all(w > 0 for w in table.column("n_ci95").to_pylist())


def test_adbc_catalog_lists_only_readable_columns(demo):
    with connect(demo) as conn:
        objects = conn.adbc_get_objects(depth="all").read_all().to_pylist()
        schema = conn.adbc_get_table_schema("patients", catalog_filter="ehr", db_schema_filter="public")
    catalogs = [c["catalog_name"] for c in objects]
    assert catalogs == ["ehr"]
    tables = sorted(
        t["table_name"] for s in objects[0]["catalog_db_schemas"] for t in s["db_schema_tables"]
    )
    assert tables == ["conditions", "encounters", "observations", "patients"]
    assert "ssn" not in schema.names and "first_name" not in schema.names
    assert "birth_date" in schema.names and "patient_id" in schema.names


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(data)) + data


def statement(sql: str) -> bytes:
    """A Flight SQL CommandStatementQuery packed in a protobuf Any, by hand."""
    return _field(
        1, b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery"
    ) + _field(2, _field(1, sql.encode()))


def test_pyarrow_flight_statement_with_receipt_metadata(demo):
    client = fl.FlightClient(demo.info["flight_url"])
    options = fl.FlightCallOptions(headers=[
        (b"authorization", f"Bearer {demo.token('alice')}".encode()),
        (b"x-consentry-study", demo.info["study"]["id"].encode()),
        (b"x-consentry-epsilon", b"0.25"),
    ])
    sql = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex ORDER BY sex"
    info = client.get_flight_info(fl.FlightDescriptor.for_command(statement(sql)), options)
    meta = json.loads(info.app_metadata)
    assert meta["epsilon_spent"] == 0.25
    assert meta["budget"]["epsilon_left"] < demo.info["study"]["epsilon"]
    table = pa.concat_tables(client.do_get(ep.ticket, options).read_all() for ep in info.endpoints)
    assert table.column("sex").to_pylist() == ["F", "M"]

    # The same statement again is an identical repeat: same answer, nothing spent.
    again = client.get_flight_info(fl.FlightDescriptor.for_command(statement(sql)), options)
    meta2 = json.loads(again.app_metadata)
    assert meta2["repeated"] is True
    assert meta2["budget"]["epsilon_left"] == meta["budget"]["epsilon_left"]
    table2 = pa.concat_tables(client.do_get(ep.ticket, options).read_all() for ep in again.endpoints)
    assert table2.equals(table)

    # A ticket is good once.
    with pytest.raises(KeyError) as e:  # Flight's NotFound
        client.do_get(again.endpoints[0].ticket, options).read_all()
    assert "no result waits" in str(e.value)

    # No token: unauthenticated.
    with pytest.raises(fl.FlightUnauthenticatedError):
        client.get_flight_info(fl.FlightDescriptor.for_command(statement(sql)))


def _budget_left(demo, study: str) -> float:
    """The study's budget left, read by a dry run (which spends nothing)."""
    client = fl.FlightClient(demo.info["flight_url"])
    options = fl.FlightCallOptions(headers=[
        (b"authorization", f"Bearer {demo.token('alice')}".encode()),
        (b"x-consentry-study", study.encode()),
        (b"x-consentry-dry-run", b"true"),
    ])
    info = client.get_flight_info(
        fl.FlightDescriptor.for_command(statement("SELECT COUNT(*) AS n FROM patients")), options
    )
    return json.loads(info.app_metadata)["budget"]["epsilon_left"]


def test_adbc_budget_exhaustion_is_named_and_spends_nothing(demo):
    """ADBC's Go driver maps gRPC's RESOURCE_EXHAUSTED to its own `InternalError` (its table,
    not the broker's): the message still carries the code and the budget left, and nothing is
    spent."""
    study = demo.info["study"]["id"]
    before = _budget_left(demo, study)
    with connect(demo, study=study, epsilon=before + 1) as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as e:
            cur.execute("SELECT COUNT(*) AS n FROM patients")
    message = str(e.value)
    assert "ResourceExhausted" in message and "privacy budget exhausted" in message, message
    assert "receipt" in message
    assert _budget_left(demo, study) == before


def test_sqlalchemy_dialect_browses_the_catalog_and_queries(demo):
    """SQLAlchemy's Flight SQL dialect (`flightsql-dbapi`, what Superset connects with; its
    entry point is `datafusion://`): the headers ride in the URL's query, identifiers quote as
    the server's SQL info says."""
    from sqlalchemy import create_engine, inspect, text

    study = demo.info["study"]["id"]
    host_port = demo.info["flight_url"].removeprefix("grpc://")
    url = (
        f"datafusion://{host_port}?insecure=true&token={demo.token('alice')}"
        f"&x-consentry-study={study}&x-consentry-epsilon=0.2"
    )
    engine = create_engine(url)
    with engine.connect() as conn:
        inspector = inspect(conn)
        assert inspector.get_schema_names() == ["public"]
        assert sorted(inspector.get_table_names()) == [
            "conditions", "encounters", "observations", "patients"]
        columns = [c["name"] for c in inspector.get_columns("patients")]
        assert "patient_id" in columns and "sex" in columns
        assert not {"ssn", "first_name", "last_name", "address"} & set(columns), columns
        rows = conn.execute(text(
            'SELECT "sex", COUNT(*) AS n FROM "patients" GROUP BY "sex" ORDER BY "sex"'
        )).fetchall()
        assert [r[0] for r in rows] == ["F", "M"]
        assert all(r[2] > 0 for r in rows)  # n_ci95: each cell's 95% half-width
        with pytest.raises(Exception) as e:
            conn.execute(text("SELECT ssn, COUNT(*) AS n FROM patients GROUP BY ssn"))
        assert "invalid argument" in str(e.value) and "ssn" in str(e.value)


def test_polars_reads_through_an_adbc_connection(demo):
    """Polars takes the ADBC connection, which carries the token and the study.
    (`pl.read_database_uri(..., engine="adbc")` hands the driver the URI alone, and the Flight
    SQL driver reads no credentials or headers from a URI, so it reaches no authenticated
    Flight SQL server.)"""
    import polars as pl

    study = demo.info["study"]["id"]
    with connect(demo, study=study, epsilon=0.2) as conn:
        frame = pl.read_database(
            "SELECT code, COUNT(DISTINCT patient_id) AS patients FROM conditions "
            "GROUP BY code ORDER BY code",
            connection=conn,
        )
    assert frame.columns == ["code", "patients", "patients_ci95"]
    assert frame.height > 0 and frame["patients_ci95"].min() > 0


def test_basic_auth_handshake_returns_the_bearer_token(demo):
    """The Flight SQL JDBC driver (and the BI tools over it) log in with a user name and a
    password through the Flight handshake: the password is a token from `broker token`, the
    user name its principal; the bearer token comes back for the calls that follow."""
    client = fl.FlightClient(demo.info["flight_url"])
    token = demo.token("alice")
    name, value = client.authenticate_basic_token("alice", token)
    assert name.lower() == b"authorization" and value == f"Bearer {token}".encode()
    options = fl.FlightCallOptions(headers=[
        (name, value), (b"x-consentry-study", demo.info["study"]["id"].encode())])
    info = client.get_flight_info(fl.FlightDescriptor.for_command(statement("SELECT 1")), options)
    assert json.loads(info.app_metadata)["probe"] is True
    # Another principal's name with alice's token, or a password that is no token: refused.
    for user, password in [("bob", token), ("alice", "hunter2")]:
        with pytest.raises(fl.FlightUnauthenticatedError):
            fl.FlightClient(demo.info["flight_url"]).authenticate_basic_token(user, password)
