"""The transport in process: one decoder, one dispatch table, one status table (fast unit tests;
``pytest -m "not slow"`` runs these)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import dlt
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from google.protobuf import any_pb2

from client import protocol
from flight_server._vendor import FlightSql_pb2 as pb
from flight_server.domain import errors
from flight_server.testing.servers import InProcessServer
from flight_server.transport import status
from flight_server.transport.flight_sql import pack

PROJECT = """\
format_version: 1
project: {name: unit}
destinations:
  files: {type: duckdb, location: '%s'}
datasets:
  shop: {destination: files}
profiles:
  access:
    datasets:
      shop: {write: true}
server: {anonymous_profile: access}
"""


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """A small project loaded with an ordinary dlt pipeline, served in this process."""
    root = tmp_path_factory.mktemp("unit")
    database = root / "store.duckdb"
    pipeline = dlt.pipeline("unit_owner", destination=dlt.destinations.duckdb(str(database)), dataset_name="shop",
                            pipelines_dir=str(root / "pipelines"))
    pipeline.run([{"id": i, "name": f"n{i}", "tags": [{"t": "a"}]} for i in range(5)], table_name="orders")\
        .raise_on_failed_jobs()
    (root / "dlt.yml").write_text(PROJECT % database)
    with InProcessServer(root / "dlt.yml") as server:
        yield server


def _client(unit: InProcessServer) -> flight.FlightClient:
    return flight.connect(unit.url)


def test_every_rpc_goes_through_the_one_table(unit: InProcessServer) -> None:
    client = _client(unit)
    assert [a.type for a in client.list_actions()] == list(protocol.ACTIONS)
    listing = protocol.CatalogInfo.from_bytes(next(client.do_action(flight.Action(protocol.ACTION_LIST_DATASETS, b""))).body.to_pybytes())
    assert [d.name for d in listing.datasets] == ["shop"] and "orders" in listing.datasets[0].tables
    info = client.get_flight_info(flight.FlightDescriptor.for_path("shop", "orders"))
    assert client.do_get(info.endpoints[0].ticket).read_all().num_rows == 5 == info.total_records
    health = json.loads(next(client.do_action(flight.Action(protocol.ACTION_HEALTH, b""))).body.to_pybytes())
    assert health["calls"]["do_get"] >= 1 and health["calls"]["get_flight_info"] >= 1


def test_what_no_handler_takes_says_what_is_taken_instead(unit: InProcessServer) -> None:
    client = _client(unit)
    unknown = any_pb2.Any(type_url="type.googleapis.com/arrow.flight.protocol.sql.CommandGetCrossReference", value=b"")
    with pytest.raises(pa.ArrowNotImplementedError) as err:  # UNIMPLEMENTED
        client.get_flight_info(flight.FlightDescriptor.for_command(unknown.SerializeToString()))
    assert "CommandGetCrossReference is not supported" in str(err.value) and "CommandStatementQuery" in str(err.value)
    # a known Flight SQL message on an RPC where it means nothing
    ingest = flight.FlightDescriptor.for_command(pack(pb.CommandStatementIngest(table="t", schema="shop")))
    with pytest.raises(pa.ArrowNotImplementedError, match="CommandStatementIngest is not supported by this server on GetFlightInfo"):
        client.get_flight_info(ingest)
    # one of our commands on the wrong RPC: a client mistake, said in words
    write = flight.FlightDescriptor.for_command(protocol.encode_command(protocol.WriteCommand("shop", "orders")))
    with pytest.raises(pa.ArrowInvalid, match="GetFlightInfo takes a read or sql command"):
        client.get_flight_info(write)
    with pytest.raises(pa.ArrowNotImplementedError, match="action 'nope' is not supported; actions: list-datasets, health"):
        list(client.do_action(flight.Action("nope", b"")))
    with pytest.raises(pa.ArrowNotImplementedError, match="DoExchange is not supported"):
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("shop", "orders"))
        reader.read_all()


def test_errors_leave_as_status_name_and_text_once(unit: InProcessServer) -> None:
    """No traceback and no repeated text in the detail pyarrow appends (no process-wide tracebacklimit)."""
    with pytest.raises(pa.ArrowKeyError) as err:
        _client(unit).get_flight_info(flight.FlightDescriptor.for_path("shop", "nope"))
    text = str(err.value)
    assert text.count("Table 'nope' not found") == 1 and "Traceback" not in text and ".py" not in text, text
    assert text.endswith("Detail: Python exception: NotFound"), text


def test_a_read_checks_the_grant_once_per_request_and_the_listing_reads_no_data(
        unit: InProcessServer, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = unit.server.catalog
    grants: list[str] = []
    original = type(catalog).grant
    monkeypatch.setattr(catalog, "grant", lambda profile, dataset: grants.append(dataset) or original(catalog, profile, dataset))
    client = _client(unit)
    info = client.get_flight_info(flight.FlightDescriptor.for_path("shop", "orders"))
    assert grants == ["shop"]
    client.do_get(info.endpoints[0].ticket).read_all()
    assert grants == ["shop", "shop"]
    storage = catalog.storage("shop")
    touched: list[str] = []
    for name in ("reader", "row_count", "partitions", "row_bytes"):
        real = getattr(storage, name)
        monkeypatch.setattr(storage, name, lambda *a, _n=name, _f=real, **k: touched.append(_n) or _f(*a, **k))
    infos = list(client.list_flights())
    assert {tuple(p.decode() for p in i.descriptor.path) for i in infos} >= {("shop", "orders"), ("shop", "orders__tags")}
    assert touched == [] and all(i.total_records == -1 for i in infos)


def test_a_save_drops_the_cache_of_its_dataset_on_both_surfaces_even_when_refused(
        unit: InProcessServer, monkeypatch: pytest.MonkeyPatch) -> None:
    evicted: list[str] = []
    real = unit.server.cache.evict
    monkeypatch.setattr(unit.server.cache, "evict", lambda dataset: evicted.append(dataset) or real(dataset))
    client = _client(unit)
    data = pa.table({"k": [1, 2]})
    writer, _ = client.do_put(flight.FlightDescriptor.for_path("shop", "saved"), data.schema)
    writer.write_table(data)
    writer.close()
    assert evicted == ["shop"]
    bad = pa.table({"_dlt_secret": [1]})
    writer, _ = client.do_put(flight.FlightDescriptor.for_path("shop", "saved"), bad.schema)
    with pytest.raises(pa.ArrowInvalid):
        writer.write_table(bad)
        writer.close()
    assert evicted == ["shop", "shop"]


@pytest.mark.parametrize("error, expected", [
    (errors.NotFound("x"), KeyError), (errors.InvalidRequest("x"), ValueError),
    (errors.SqlSyntaxError("x"), ValueError), (errors.Unsupported("x"), NotImplementedError),
    (errors.Forbidden("x"), flight.FlightUnauthorizedError), (errors.ContractViolation("x"), flight.FlightUnauthorizedError),
    (errors.Unauthenticated("x"), flight.FlightUnauthenticatedError), (errors.Unavailable("x"), flight.FlightUnavailableError),
    (errors.Cancelled("x"), flight.FlightCancelledError), (protocol.ProtocolError("x"), ValueError),
])
def test_the_one_status_table(error: Exception, expected: type[BaseException]) -> None:
    mapped = status.to_flight_error(error)
    assert isinstance(mapped, expected) and not isinstance(mapped, errors.ServiceError)


def test_the_status_table_hides_the_unexpected_and_masks_secrets() -> None:
    internal = status.to_flight_error(RuntimeError("postgresql://u:hunter2@db/x exploded"))
    assert isinstance(internal, flight.FlightInternalError) and "hunter2" not in str(internal)
    forbidden = status.to_flight_error(errors.Forbidden("no access to postgresql://u:hunter2@db/x", url="postgresql://u:hunter2@db/x"))
    assert "hunter2" not in str(forbidden) and b"hunter2" not in (forbidden.extra_info or b"")
    long = status.to_flight_error(errors.InvalidRequest("n" * 10_000))
    assert len(str(long)) <= status.MAX_MESSAGE_CHARS + 20




@pytest.mark.parametrize("error", [
    RuntimeError("boom"), errors.Forbidden("not yours"), errors.Unavailable("down"), errors.Unauthenticated("who"),
    flight.FlightUnavailableError("a library's own"), errors.InvalidRequest("x\ud800y"), errors.NotFound("no \udfff"),
], ids=["internal", "forbidden", "unavailable", "unauthenticated", "flight", "surrogate", "notfound"])
def test_no_rpc_answers_with_a_traceback_or_a_library_encoding_error(
        unit: InProcessServer, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Regression (review 22, F9): pyarrow's GetSchema wrapper turns whatever it gets - a FlightError too - into a
    Python error with its formatted traceback (the server's file names); other RPCs turn a FlightError into its
    status themselves, but choke on a message that is not UTF-8. Whatever a handler raises, every RPC answers its
    text (lone surrogates escaped), and at most the status's name after it. (CANCELLED is left out: pyarrow's
    client turns it into a KeyboardInterrupt of the test process.)"""
    def fail(*_args: object) -> None:
        raise error

    for key in [("get_schema", "read"), ("get_flight_info", "read"), ("do_action", protocol.ACTION_LIST_DATASETS),
                ("list_actions", ""), ("do_get", "read")]:
        monkeypatch.setitem(unit.server.routes, key, fail)
    client = _client(unit)
    descriptor = flight.FlightDescriptor.for_path("shop", "orders")
    ticket = flight.Ticket(unit.server.security.tickets.sign(protocol.encode_command(protocol.ReadCommand("shop", "orders")),
                                                             "(anonymous)")[0])
    calls = {"get_schema": lambda: client.get_schema(descriptor), "get_flight_info": lambda: client.get_flight_info(descriptor),
             "do_action": lambda: list(client.do_action(flight.Action(protocol.ACTION_LIST_DATASETS, b""))),
             "list_actions": lambda: client.list_actions(), "do_get": lambda: client.do_get(ticket).read_all()}
    for rpc, call in calls.items():
        with pytest.raises(pa.ArrowException) as err:
            call()
        text = str(err.value)
        assert "Traceback" not in text and 'File "' not in text and ".py" not in text and "codec" not in text, (rpc, text)
        expected = "internal server error; see the server log" if isinstance(error, RuntimeError) \
            else str(error).encode("utf-8", "backslashreplace").decode()
        assert protocol.server_message(text).count(expected) == 1, (rpc, text)


def test_every_mapped_error_refuses_to_be_formatted() -> None:
    """What leaves the status table cannot be formatted with a traceback: pyarrow then says the status's name."""
    import traceback

    for error in (errors.NotFound("x"), errors.InvalidRequest("x"), errors.Unsupported("x"), errors.Forbidden("x"),
                  errors.Unauthenticated("x"), errors.Unavailable("x"), errors.Cancelled("x"), RuntimeError("x"),
                  flight.FlightInternalError("x"), flight.FlightTimedOutError("x"), flight.FlightServerError("x"),
                  flight.FlightUnauthorizedError("x"), flight.FlightCancelledError("x")):
        mapped = status.to_flight_error(error)
        with pytest.raises(LookupError):
            traceback.format_exception(mapped)
        assert status.to_flight_error(mapped) is mapped
        assert type(error) in type(mapped).__mro__ or not isinstance(error, flight.FlightError)


def test_the_load_history_is_readable_and_read_only(unit: InProcessServer) -> None:
    """dlt's ``_dlt_loads`` (the lineage consumers need): ``dataset.loads()`` and SQL; never listed, never written."""
    from client import InvalidRequestError, connect

    ds = connect(unit.url).shop
    loads = ds.loads().arrow()
    assert {"load_id", "schema_name", "status", "inserted_at"} <= set(loads.column_names)
    assert loads.num_rows >= 1 and set(loads.column("status").to_pylist()) == {0}
    assert "_dlt_loads" not in ds.tables
    counted = ds.sql("SELECT count(*) AS n FROM _dlt_loads").arrow().column("n")[0].as_py()
    assert counted == loads.num_rows
    joined = ds.sql("SELECT count(*) AS n FROM orders o JOIN _dlt_loads l ON o._dlt_load_id = l.load_id")
    assert joined.arrow().column("n")[0].as_py() == 5
    with pytest.raises(InvalidRequestError, match="reserved for dlt"):
        ds.save(pa.table({"load_id": ["x"]}), table_name="_dlt_loads")


@pytest.mark.parametrize("values, match", [
    (pa.table({"a": pa.array([2**40], pa.timestamp("s"))}), r"parameter \$1 .* cannot be bound: date value out of range"),
    (pa.table({"a": pa.array([0], pa.timestamp("ns", tz="Mars/Phobos"))}), "unknown time zone"),
    (pa.table({"a": pa.array([10**40], pa.decimal256(41, 0))}), r"decimal256\(41, 0\), which cannot be bound"),
    (pa.table({"a": pa.array([[("k", 1)]], pa.map_(pa.string(), pa.int64()))}), "map<string, int64>"),
    (pa.table({"a": pa.array([[{"x": "y"}]], pa.list_(pa.struct([("x", pa.dictionary(pa.int8(), pa.string()))])))}),
     r"dictionary<values=string, indices=int8.*inside"),
])
def test_bound_values_that_would_not_arrive_as_sent_are_refused_in_plain_words(values: pa.Table, match: str) -> None:
    """A value Python cannot hold (a year beyond 9999, an unknown zone) or a type duckdb would change (a map into
    pairs, a 41-digit decimal into a double) is refused when it is bound, never a sandbox failure to retry."""
    from flight_server.domain.errors import InvalidRequest
    from flight_server.domain.sql import check_parameters

    with pytest.raises(InvalidRequest, match=match):
        check_parameters(values, 1)
