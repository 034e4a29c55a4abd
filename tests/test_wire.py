"""Wire conformance: every plain RPC through a grpcio client generated from Flight.proto (no pyarrow).

The client path is grpc + protobuf stubs only; pyarrow appears in these tests solely to make test
data and to cross-check decoded bytes. Also the standard gRPC health service on the side port.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pyarrow as pa
import pytest
from google.protobuf import any_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import connect
from flight_server._vendor import FlightSql_pb2 as sql_pb
from flight_server.testing.servers import REPO, ServerProcess, make_project
from flight_server.transport.flight_sql import pack
from tests import wire

EVENTS = "github_events_dataset"
REPORTS = "reports_dataset"
_HEALTH = re.compile(r"health service \(grpc\.health\.v1\) on [^:]+:(\d+)")
# what must never reach a client: server tracebacks and source locations
_LEAKS = ("Traceback", 'File "', ".py\"", ".py:", ", line ")


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    """Flight_pb2 and Flight_pb2_grpc, generated now from tests/proto/Flight.proto."""
    return wire.generate(tmp_path_factory.mktemp("flight_proto"))


@pytest.fixture(scope="module")
def wire_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server over its own demo project (these tests write), with the health service on a side port."""
    project = make_project(tmp_path_factory.mktemp("wire"), events=300)
    with ServerProcess(project, "--health-port", "0") as proc:
        yield proc
        assert proc.alive, proc.output()


@pytest.fixture()
def pb(stubs: tuple[ModuleType, ModuleType]) -> ModuleType:
    return stubs[0]


@pytest.fixture()
def stub(stubs: tuple[ModuleType, ModuleType], wire_server: ServerProcess) -> Iterator[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{wire_server.port}") as channel:
        yield stubs[1].FlightServiceStub(channel)


def _path(pb: ModuleType, *parts: str) -> Any:
    return pb.FlightDescriptor(type=pb.FlightDescriptor.PATH, path=list(parts))


def _cmd(pb: ModuleType, data: bytes) -> Any:
    return pb.FlightDescriptor(type=pb.FlightDescriptor.CMD, cmd=data)


def _schema_bytes_ok(data: bytes) -> pa.Schema:
    """FlightInfo/SchemaResult.schema: an IPC-encapsulated Schema message; returns it decoded for comparison."""
    flatbuffer, rest = wire.split_encapsulated(data)
    assert wire.message_header(flatbuffer) == (wire.HEADER_SCHEMA, 0)
    assert rest == b""
    return pa.ipc.read_schema(pa.py_buffer(data))


def _rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not isinstance(result, (bytes, str)) and hasattr(result, "__iter__"):
            list(result)
    return info.value


def _trailer(error: grpc.RpcError, key: str) -> bytes | str | None:
    return dict(error.trailing_metadata() or ()).get(key)


def _ipc_messages(table: pa.Table) -> list[tuple[bytes, bytes]]:
    """A table as FlightData (data_header, data_body) pairs, cut from an IPC stream."""
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    raw, pos, out = sink.getvalue(), 0, []
    while True:
        flatbuffer, rest = wire.split_encapsulated(raw[pos:])
        if not flatbuffer:  # end-of-stream marker
            return out
        _, body_length = wire.message_header(flatbuffer)
        out.append((flatbuffer, rest[:body_length]))
        pos += 8 + len(flatbuffer) + body_length


def _put_stream(pb: ModuleType, descriptor: Any, table: pa.Table) -> Iterator[Any]:
    messages = _ipc_messages(table)
    yield pb.FlightData(flight_descriptor=descriptor, data_header=messages[0][0])
    for header, body in messages[1:]:
        yield pb.FlightData(data_header=header, data_body=body)


# --- reads ---------------------------------------------------------------------------------------

def test_list_flights_one_info_per_table(pb, stub, wire_server: ServerProcess) -> None:
    infos = list(stub.ListFlights(pb.Criteria()))
    with connect(wire_server.url) as catalog:
        expected = {(d, t) for d in (EVENTS, REPORTS) for t in catalog[d].tables}
        assert {tuple(i.flight_descriptor.path) for i in infos} == expected
        for info in infos:
            dataset, table = info.flight_descriptor.path
            assert info.flight_descriptor.type == pb.FlightDescriptor.PATH
            assert _schema_bytes_ok(info.schema).equals(catalog[dataset][table].schema)
            assert info.total_records == -1  # the listing reads no data; GetFlightInfo counts
            assert len(info.endpoint) == 1 and info.endpoint[0].ticket.ticket and not info.endpoint[0].location
    # criteria narrow to one dataset
    narrowed = list(stub.ListFlights(pb.Criteria(expression=EVENTS.encode())))
    assert {i.flight_descriptor.path[0] for i in narrowed} == {EVENTS}


def test_get_flight_info_and_get_schema_agree(pb, stub) -> None:
    descriptor = _path(pb, EVENTS, "issues_event")
    info, call = stub.GetFlightInfo.with_call(descriptor)
    schema = stub.GetSchema(descriptor).schema
    assert schema == info.schema
    assert "payload__issue__title" in _schema_bytes_ok(schema).names
    assert info.flight_descriptor == descriptor
    # no custom headers: nothing a client must understand beyond gRPC's own
    assert not [k for k, _ in call.initial_metadata() if not k.startswith("grpc-")]
    command = json.dumps({"v": 1, "op": "read", "dataset": EVENTS, "table": "issues_event", "columns": ["id"],
                          "limit": 5}).encode()
    info = stub.GetFlightInfo(_cmd(pb, command))
    assert _schema_bytes_ok(info.schema).names == ["id"] and info.total_records == 5


def test_do_get_is_an_ipc_stream(pb, stub, wire_server: ServerProcess) -> None:
    info = stub.GetFlightInfo(_path(pb, EVENTS, "push_event"))
    messages = list(stub.DoGet(info.endpoint[0].ticket))
    kinds = [wire.message_header(m.data_header) for m in messages]
    # the schema first (no body), then record batches whose bodyLength is the body sent, 8-byte aligned
    assert kinds[0] == (wire.HEADER_SCHEMA, 0) and not messages[0].data_body
    assert len(messages) >= 2
    for message, (kind, body_length) in zip(messages[1:], kinds[1:]):
        assert kind == wire.HEADER_RECORD_BATCH
        assert body_length == len(message.data_body) and body_length % 8 == 0
    table = pa.ipc.open_stream(wire.ipc_stream([(m.data_header, m.data_body) for m in messages])).read_all()
    with connect(wire_server.url) as catalog:
        expected = catalog[EVENTS]["push_event"].arrow()
    assert table.equals(expected)
    assert table.schema.equals(_schema_bytes_ok(info.schema))


def test_sql_command_and_flight_sql_statement_on_the_wire(pb, stub) -> None:
    plain = json.dumps({"v": 1, "op": "sql", "dataset": EVENTS, "query": "SELECT count(*) AS n FROM push_event"})
    fsql = pack(sql_pb.CommandStatementQuery(query=f"SELECT count(*) AS n FROM {EVENTS}.push_event"))
    counts = []
    for descriptor in (_cmd(pb, plain.encode()), _cmd(pb, fsql)):
        info = stub.GetFlightInfo(descriptor)
        messages = list(stub.DoGet(info.endpoint[0].ticket))
        table = pa.ipc.open_stream(wire.ipc_stream([(m.data_header, m.data_body) for m in messages])).read_all()
        counts.append(table.column("n")[0].as_py())
    assert counts[0] == counts[1] > 0


# --- errors --------------------------------------------------------------------------------------

def test_status_codes_and_messages(pb, stub) -> None:
    unknown_fsql = any_pb2.Any(type_url="type.googleapis.com/arrow.flight.protocol.sql.CommandGetCrossReference",
                               value=b"").SerializeToString()
    cases = [
        (lambda: stub.GetFlightInfo(_path(pb, "nope", "t")), grpc.StatusCode.NOT_FOUND,
         "Dataset 'nope' not found in project dlt_example_project for profile access"),
        (lambda: stub.GetSchema(_path(pb, EVENTS, "nope")), grpc.StatusCode.NOT_FOUND,
         "Table 'nope' not found in dataset 'github_events_dataset'"),
        # tickets are signed by the server: a hand-made one is refused, whatever it names
        (lambda: stub.DoGet(pb.Ticket(ticket=b'{"v":1,"op":"read","dataset":"github_events_dataset","table":"x"}')),
         grpc.StatusCode.INVALID_ARGUMENT, "ticket is not a valid flight-share ticket"),
        (lambda: stub.GetFlightInfo(_cmd(pb, b"{bad")), grpc.StatusCode.INVALID_ARGUMENT, "command is not UTF-8 JSON"),
        (lambda: stub.GetFlightInfo(_path(pb, "a", "b", "c")), grpc.StatusCode.INVALID_ARGUMENT,
         "a path descriptor must be [dataset, table], got 3 part(s)"),
        (lambda: stub.GetFlightInfo(_cmd(pb, json.dumps({"op": "sql", "dataset": EVENTS, "query": "DROP TABLE x"}).encode())),
         grpc.StatusCode.INVALID_ARGUMENT, "only SELECT queries are allowed"),
        (lambda: stub.DoAction(pb.Action(type="nope")), grpc.StatusCode.UNIMPLEMENTED, "action 'nope' is not supported"),
        (lambda: stub.GetFlightInfo(_cmd(pb, unknown_fsql)), grpc.StatusCode.UNIMPLEMENTED,
         "Flight SQL CommandGetCrossReference is not supported by this server on GetFlightInfo"),
        (lambda: stub.DoExchange(iter([pb.FlightData(flight_descriptor=_path(pb, EVENTS, "push_event"))])),
         grpc.StatusCode.UNIMPLEMENTED, ""),
        (lambda: stub.PollFlightInfo(_path(pb, EVENTS, "push_event")), grpc.StatusCode.UNIMPLEMENTED, ""),
    ]
    for call, code, text in cases:
        error = _rpc_error(call)
        assert error.code() == code, (text, error.details())
        assert text in error.details()
        assert not any(leak in error.details() for leak in _LEAKS), error.details()
        if text:
            # the undecorated user-facing text rides in a trailer for clients that want it exactly
            assert _trailer(error, "x-arrow-status-message-bin").decode().startswith(text)


# --- writes --------------------------------------------------------------------------------------

def test_do_put_stores_rows_and_answers_load_info(pb, stub, wire_server: ServerProcess) -> None:
    data = pa.table({"payload__action": ["opened", "closed", "reopened"], "n": [1, 2, 3]})
    results = list(stub.DoPut(_put_stream(pb, _path(pb, REPORTS, "wire_put"), data)))
    assert len(results) == 1
    load_info = json.loads(results[0].app_metadata)["load_info"]
    assert load_info["rows"] == 3 and load_info["table_name"] == "wire_put"
    assert load_info["pipeline_name"] == "save_wire_put_pipeline" and load_info["failed_jobs"] == 0
    with connect(wire_server.url) as catalog:
        assert catalog[REPORTS]["wire_put"].arrow().select(["payload__action", "n"]).equals(data)


def test_do_put_contract_violation_is_permission_denied_with_fields(pb, stub) -> None:
    data = pa.table({"payload__action": ["opened"], "n": [1]})
    error = _rpc_error(lambda: stub.DoPut(_put_stream(pb, _path(pb, EVENTS, "aggregated_issues"), data)))
    text = ("In schema: events: In Schema: events Table: aggregated_issues. Contract on tables with mode freeze is "
            "violated. Trying to add table aggregated_issues but new tables are frozen.")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details().startswith(text)  # pyarrow appends ". Detail: Unauthorized"
    detail = json.loads(_trailer(error, "grpc-status-details-bin"))
    assert detail["error"] == "ContractViolation" and detail["message"] == text
    assert detail["fields"]["table_name"] == "aggregated_issues" and detail["fields"]["contract_mode"] == "freeze"


def test_flight_sql_ingest_answers_raw_do_put_update_result(pb, stub) -> None:
    options = sql_pb.CommandStatementIngest.TableDefinitionOptions
    command = sql_pb.CommandStatementIngest(
        table="wire_ingest", schema=REPORTS,
        table_definition_options=options(if_not_exist=options.TABLE_NOT_EXIST_OPTION_CREATE,
                                         if_exists=options.TABLE_EXISTS_OPTION_APPEND))
    data = pa.table({"payload__action": ["a", "b"], "n": [1, 2]})
    results = list(stub.DoPut(_put_stream(pb, _cmd(pb, pack(command)), data)))
    assert sql_pb.DoPutUpdateResult.FromString(results[0].app_metadata).record_count == 2
    unspecified = sql_pb.CommandStatementIngest(table="wire_ingest", schema=REPORTS)
    error = _rpc_error(lambda: stub.DoPut(_put_stream(pb, _cmd(pb, pack(unspecified)), data)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "table_definition_options must set if_not_exist (CREATE or FAIL) and if_exists" in error.details()


# --- actions -------------------------------------------------------------------------------------

def test_actions(pb, stub) -> None:
    assert [(a.type, bool(a.description)) for a in stub.ListActions(pb.Empty())] == [
        ("list-datasets", True), ("health", True)]
    (health,) = list(stub.DoAction(pb.Action(type="health")))
    answer = json.loads(health.body)
    assert answer["status"] == "ok" and answer["project"] == "dlt_example_project"
    assert answer["calls"].get("do_action", 0) >= 0 and isinstance(answer["calls"], dict)
    (listing,) = list(stub.DoAction(pb.Action(type="list-datasets", body=json.dumps({"datasets": [EVENTS]}).encode())))
    body = json.loads(listing.body)
    assert body["profile"] == "access" and [d["name"] for d in body["datasets"]] == [EVENTS]
    (closed,) = list(stub.DoAction(pb.Action(type="CloseSession")))
    assert closed.body == b"\x08\x01"  # CloseSessionResult{status: CLOSED}


# --- health --------------------------------------------------------------------------------------

def _health_port(server: ServerProcess) -> int:
    match = _HEALTH.search(server.output())
    assert match, server.output()
    return int(match.group(1))


def test_health_service_reports_serving(wire_server: ServerProcess) -> None:
    port = _health_port(wire_server)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "arrow.flight.protocol.FlightService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    probe = subprocess.run([sys.executable, "-m", "flight_server.transport.health", f"127.0.0.1:{port}"], cwd=REPO, timeout=60)
    assert probe.returncode == 0


def test_health_probe_fails_when_the_server_is_gone(demo_project: Path) -> None:
    with ServerProcess(demo_project, "--health-port", "0") as proc:
        port = _health_port(proc)
    probe = subprocess.run([sys.executable, "-m", "flight_server.transport.health", str(port)], cwd=REPO, timeout=60)
    assert probe.returncode == 1


def test_do_put_whose_schema_changes_mid_stream_is_refused_and_writes_nothing(pb, stub, wire_server: ServerProcess) -> None:
    """A raw client sends one table's schema and batches, then a second schema and its batches:
    the upload is refused as an invalid Arrow stream and nothing of it is stored."""
    first = _ipc_messages(pa.table({"n": [1, 2]}))
    second = _ipc_messages(pa.table({"n": ["a", "b"], "extra": [1.5, 2.5]}))

    def frames() -> Iterator[Any]:
        yield pb.FlightData(flight_descriptor=_path(pb, REPORTS, "shifting"), data_header=first[0][0])
        for header, body in first[1:]:
            yield pb.FlightData(data_header=header, data_body=body)
        for header, body in second:  # a new schema message in the middle of the stream, then its batch
            yield pb.FlightData(data_header=header, data_body=body)

    error = _rpc_error(lambda: list(stub.DoPut(frames())))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "not a valid Arrow stream" in error.details()
    assert not any(leak in error.details() for leak in _LEAKS)
    with connect(wire_server.url) as catalog:
        assert "shifting" not in catalog[REPORTS].tables
    assert wire_server.alive


def test_the_typed_wire_messages_round_trip_and_refuse_what_is_not_theirs() -> None:
    """list-datasets bodies, endpoint metadata and put results: one definition each, in client/protocol.py."""
    from client.protocol import (
        EndpointMetadata,
        ListDatasetsRequest,
        ProtocolError,
        PutResult,
    )

    assert ListDatasetsRequest.from_bytes(b"") == ListDatasetsRequest()
    assert ListDatasetsRequest.from_bytes(ListDatasetsRequest(("a", "b")).to_bytes()).datasets == ("a", "b")
    for bad in (b"[", b'{"datasets": "a"}', b'{"datasets": [""]}', b'{"datasets": [1]}', b"[[[[", b"x" * (2 << 20)):
        with pytest.raises(ProtocolError, match="list-datasets body"):
            ListDatasetsRequest.from_bytes(bad)
    assert EndpointMetadata.from_bytes(EndpointMetadata(3, 1000).to_bytes()) == EndpointMetadata(3, 1000)
    assert PutResult.from_bytes(PutResult({"rows": 1}).to_bytes()).load_info == {"rows": 1}
    with pytest.raises(ProtocolError, match="load_info"):
        PutResult.from_bytes(b'{"x": 1}')
