"""Hostile input against the real server: malformed and oversized requests, odd names, vanishing clients, fuzzing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import protocol
from client.protocol import ReadCommand, SqlCommand, encode_command
from flight_server.testing.servers import REPO, wait_until
from tests.conftest import Secured
from tests.security import EVENTS, SECRETS

# what a client mistake may come back as: never INTERNAL, never UNKNOWN
CLIENT_MISTAKES = (pa.ArrowInvalid, pa.ArrowKeyError, pa.ArrowNotImplementedError,
                   flight.FlightUnauthorizedError, flight.FlightUnauthenticatedError)


def bearer(token: str) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())], timeout=30)


def assert_refused_cleanly(call: Callable[[], Any], server: Secured) -> BaseException | None:
    """The call either works or fails as a client mistake with a clean message; the server keeps serving."""
    try:
        call()
        error = None
    except CLIENT_MISTAKES as exc:
        error = exc
        message = str(exc)
        assert "Traceback" not in message and 'File "' not in message, message
        for secret in SECRETS:
            assert secret not in message
    assert server.proc.alive
    return error


NAMES = ["..", "../../etc/passwd", "a/b", "/etc/passwd", "name\x00with_nul", "x" * 10_000, "", " ", "é🦆",
         'quote"d', "semi;colon", "push_event; DROP TABLE push_event", "\n", "%s%s%n"]


@pytest.mark.parametrize("name", NAMES, ids=range(len(NAMES)))
def test_odd_names_in_path_descriptors_commands_and_criteria(secured: Secured, name: str) -> None:
    client, options = secured.raw(), bearer(secured.token())
    calls = [
        lambda: client.get_flight_info(flight.FlightDescriptor.for_path(name, "push_event"), options),
        lambda: client.get_flight_info(flight.FlightDescriptor.for_path(EVENTS, name), options),
        lambda: client.get_schema(flight.FlightDescriptor.for_path(EVENTS, name), options),
        lambda: client.get_flight_info(flight.FlightDescriptor.for_command(
            json.dumps({"op": "read", "dataset": EVENTS, "table": "push_event", "columns": [name]}).encode()), options),
        lambda: client.get_flight_info(flight.FlightDescriptor.for_command(
            encode_command(SqlCommand(name or "x", "SELECT 1 AS x FROM push_event"))), options),
        lambda: list(client.list_flights(name.encode(), options)),
        lambda: list(client.do_action(flight.Action("list-datasets", json.dumps({"datasets": [name]}).encode()), options)),
    ]
    for i, call in enumerate(calls):
        error = assert_refused_cleanly(call, secured)
        if i == 5 and not name.strip():
            continue  # blank ListFlights criteria mean "everything visible": fine
        assert error is not None, (i, name)
        assert len(str(error)) < 5000  # a 10,000-character name is not echoed back whole


@pytest.mark.parametrize("ticket", [
    b"", b"\x00" * 64, b"fst1.", b"fst1..", b"fst1.a.b", b"fst1.!!!.###", b"{\"op\": \"read\"}", b"x" * (3 << 20),
    b"fst1." + b"A" * 100_000 + b".AAAA", "🦆".encode() * 1000,
], ids=range(10))
def test_malformed_and_oversized_tickets(secured: Secured, ticket: bytes) -> None:
    client, options = secured.raw(), bearer(secured.token())
    error = assert_refused_cleanly(lambda: client.do_get(flight.Ticket(ticket), options).read_all(), secured)
    assert isinstance(error, pa.ArrowInvalid)


@pytest.mark.parametrize("command", [
    b"", b"null", b"[]", b"42", b'"read"', b"{" * 100_000, b"[" * 500_000, b"\xff\xfe", b'{"op": "read"}',
    b'{"op": "read", "dataset": 1, "table": 2}', b'{"op": "read", "dataset": "d", "table": "t", "limit": -1}',
    b'{"op": "read", "dataset": "github_events_dataset", "table": "push_event", "limit": 1e400}',
    b'{"op": "read", "dataset": "github_events_dataset", "table": "push_event", "limit": 100000000000000000000000}',
    b'{"op": "read", "dataset": "github_events_dataset", "table": "push_event", "columns": "id"}',
    b'{"op": "read", "dataset": "github_events_dataset", "table": "push_event", "columns": [["id"]]}',
    b'{"op": "sql", "dataset": "github_events_dataset", "query": ""}',
    b'{"op": "sql", "dataset": "github_events_dataset", "query": ' + json.dumps("SELECT 1 " + "UNION ALL SELECT 1 " * 6_000).encode() + b"}",
    json.dumps({"op": "sql", "dataset": EVENTS, "query": "SELECT " + "(" * 40_000 + "1" + ")" * 40_000}).encode(),
    b'{"v": 2, "op": "read"}', b'{"op": "write", "dataset": "d", "table": "t", "write_disposition": "merge"}',
    json.dumps({"op": "sql", "dataset": EVENTS, "query": "SELECT 1" + " " * (2 << 20)}).encode(),
], ids=range(21))
def test_malformed_and_oversized_commands(secured: Secured, command: bytes) -> None:
    client, options = secured.raw(), bearer(secured.token())
    descriptor = flight.FlightDescriptor.for_command(command)
    for call in (lambda: client.get_flight_info(descriptor, options), lambda: client.get_schema(descriptor, options)):
        assert assert_refused_cleanly(call, secured) is not None


SURROGATES = {  # valid JSON whose text is not: a lone UTF-16 surrogate (\ud800..\udfff) in any key or value
    "query": b'{"op": "sql", "dataset": "github_events_dataset", "query": "SELECT \'\\ud800\' AS x"}',
    "identifier": b'{"op": "sql", "dataset": "github_events_dataset", "query": "SELECT 1 AS \\"\\udfff\\""}',
    "sql dataset": b'{"op": "sql", "dataset": "github_\\ud800", "query": "SELECT 1"}',
    "table": b'{"op": "read", "dataset": "github_events_dataset", "table": "push\\ud800"}',
    "dataset": b'{"op": "read", "dataset": "gh\\ud800", "table": "push_event"}',
    "column": b'{"op": "read", "dataset": "github_events_dataset", "table": "push_event", "columns": ["id", "\\udc00"]}',
    "nested key": b'{"op": "read", "dataset": "github_events_dataset", "table": "push_event", "partition": {"a": [{"\\ud800": 1}]}}',
}


def _refused_as_not_text(call: Callable[[], Any], server: Secured) -> None:
    error = assert_refused_cleanly(call, server)
    assert isinstance(error, pa.ArrowInvalid), error
    assert "lone UTF-16 surrogate" in str(error) and "codec" not in str(error) and "Python exception: Unicode" not in str(error)


@pytest.mark.parametrize("name", SURROGATES)
def test_a_lone_surrogate_anywhere_in_a_command_is_refused_in_words(secure_server: Secured, name: str) -> None:
    """Regression (review 22, F9): a lone surrogate in a command's JSON was INTERNAL (sql), a traceback through
    GetSchema, or a library's UnicodeEncodeError (names): now INVALID_ARGUMENT at decode, naming the key."""
    client, options = secure_server.raw(), bearer(secure_server.token())
    descriptor = flight.FlightDescriptor.for_command(SURROGATES[name])
    _refused_as_not_text(lambda: client.get_flight_info(descriptor, options), secure_server)
    _refused_as_not_text(lambda: client.get_schema(descriptor, options), secure_server)


def test_a_lone_surrogate_in_a_save_or_an_action_is_refused_in_words(secure_server: Secured) -> None:
    client, options = secure_server.raw(), bearer(secure_server.token("rita"))
    data = pa.table({"a": [1]})

    def save() -> None:
        command = b'{"op": "write", "dataset": "reports_dataset", "table": "t\\ud800", "commit_marker": true}'
        writer, reader = client.do_put(flight.FlightDescriptor.for_command(command), data.schema, options)
        writer.write_table(data)
        writer.done_writing()
        reader.read()
        writer.close()

    _refused_as_not_text(save, secure_server)
    _refused_as_not_text(lambda: list(client.do_action(flight.Action("list-datasets", b'{"datasets": ["r\\ud800"]}'),
                                                       options)), secure_server)


def test_malformed_actions(secure_server: Secured) -> None:
    client, options = secure_server.raw(), bearer(secure_server.token())
    for action in (flight.Action("x" * 10_000, b""), flight.Action("", b""),
                   flight.Action("list-datasets", b"{not json"), flight.Action("list-datasets", b'{"datasets": "abc"}'),
                   flight.Action("list-datasets", b'{"datasets": [[1]]}'), flight.Action("list-datasets", b"[" * 100_000)):
        error = assert_refused_cleanly(lambda: list(client.do_action(action, options)), secure_server)  # noqa: B023
        assert error is not None and len(str(error)) < 5000


VANISHING_CLIENT = textwrap.dedent("""
    import os, sys
    import pyarrow.flight as flight
    url, token, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path.insert(0, {repo!r})
    from client.protocol import ReadCommand, SqlCommand, encode_command
    command = ReadCommand("github_events_dataset", "push_event") if kind == "read" else SqlCommand(
        "github_events_dataset", "SELECT a.*, b.* FROM push_event a, push_event b LIMIT 40000")
    client = flight.connect(url)
    options = flight.FlightCallOptions(headers=[(b"authorization", ("Bearer " + token).encode())])
    info = client.get_flight_info(flight.FlightDescriptor.for_command(encode_command(command)), options)
    reader = client.do_get(info.endpoints[0].ticket, options)
    reader.read_chunk()
    print("read one batch", flush=True)
    os._exit(0)  # vanish mid-stream: no close, no goodbye
""")


@pytest.mark.parametrize("kind", ["read", "sql"])
def test_client_vanishing_mid_stream(secure_server: Secured, kind: str) -> None:
    """A client killed after its first batch: the server notes CANCELLED (or an error) and keeps serving."""
    def bobs_gets() -> list[dict[str, Any]]:
        lines = [json.loads(x.split("flight_share.audit ", 1)[1]) for x in secure_server.proc.output().splitlines()
                 if "flight_share.audit " in x]
        return [x for x in lines if x["user"] == "bob" and x["rpc"] == "do_get"]

    before = len(bobs_gets())
    result = subprocess.run([sys.executable, "-c", VANISHING_CLIENT.format(repo=str(REPO)), secure_server.url,
                             secure_server.token("bob"), kind], capture_output=True, text=True, timeout=60)
    assert "read one batch" in result.stdout, result.stderr
    client, options = secure_server.raw(), bearer(secure_server.token())
    for _ in range(3):  # streams and SQL keep working
        info = client.get_flight_info(flight.FlightDescriptor.for_command(encode_command(
            SqlCommand(EVENTS, "SELECT count(*) AS n FROM push_event"))), options)
        assert client.do_get(info.endpoints[0].ticket, options).read_all().column("n")[0].as_py() > 0
    gets = wait_until(lambda: bobs_gets()[before:], "the vanished client's call audited")
    # a small table fits in the transport's buffers and is "sent" before the client dies; the SQL result does not
    allowed = ("CANCELLED", "UNKNOWN", "UNAVAILABLE") + (("ok",) if kind == "read" else ())
    assert gets and gets[-1]["outcome"] in allowed, gets[-1:]
    assert secure_server.proc.alive


# --- property-based fuzzing -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
names = st.sampled_from([EVENTS, "internal_dataset", "reports_dataset", "push_event", "nope", ""]) | st.text(max_size=300)
commands = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"op": st.sampled_from(["read", "sql", "write", "x"]), "dataset": names},
                          optional={"table": names, "columns": st.lists(names, max_size=3) | json_values,
                                    "limit": json_values | st.integers(), "query": st.text(max_size=200),
                                    "v": st.integers(0, 3), "write_disposition": st.text(max_size=10),
                                    "primary_key": json_values}).map(lambda d: json.dumps(d).encode()),
)
descriptors = st.one_of(
    commands.map(flight.FlightDescriptor.for_command),
    st.lists(names, min_size=0, max_size=4).map(lambda parts: flight.FlightDescriptor.for_path(*parts)),
)


def _valid_ticket(server: Secured) -> bytes:
    info = server.raw().get_flight_info(flight.FlightDescriptor.for_command(encode_command(ReadCommand(EVENTS, "push_event", limit=3))),
                                        bearer(server.token()))
    return info.endpoints[0].ticket.ticket


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(descriptor=descriptors, ticket=st.binary(max_size=200), flip=st.integers(0, 10_000), action=st.text(max_size=30),
       body=st.binary(max_size=200), criteria=st.binary(max_size=300))
def test_fuzz_descriptors_tickets_and_commands(secure_server: Secured, descriptor: flight.FlightDescriptor, ticket: bytes,
                                               flip: int, action: str, body: bytes, criteria: bytes) -> None:
    """Whatever arrives: no crash, no INTERNAL/UNKNOWN for a client's mistake, no secret in any answer."""
    client, options = fuzz_client(secure_server)
    genuine = bytearray(fuzz_ticket(secure_server))
    genuine[flip % len(genuine)] ^= 0x01
    calls = [
        lambda: client.get_flight_info(descriptor, options),
        lambda: client.get_schema(descriptor, options),
        lambda: client.do_get(flight.Ticket(ticket), options).read_all(),
        lambda: client.do_get(flight.Ticket(bytes(genuine)), options).read_all(),
        lambda: list(client.do_action(flight.Action(action, body), options)),
        lambda: list(client.do_action(flight.Action(protocol.ACTION_LIST_DATASETS, body), options)),
        lambda: list(client.list_flights(criteria, options)),
    ]
    for call in calls:
        assert_refused_cleanly(call, secure_server)


_FUZZ: dict[str, Any] = {}


def fuzz_client(server: Secured) -> tuple[flight.FlightClient, flight.FlightCallOptions]:
    if "client" not in _FUZZ:
        _FUZZ["client"] = (server.raw(), bearer(server.token()))
    return _FUZZ["client"]


def fuzz_ticket(server: Secured) -> bytes:
    if "ticket" not in _FUZZ:
        _FUZZ["ticket"] = _valid_ticket(server)
    return _FUZZ["ticket"]


def test_server_log_holds_no_secret_after_the_hostile_suite(secure_server: Secured) -> None:
    """Last in this module: after everything above, the server's log has no credential in it."""
    log = secure_server.proc.output()
    assert "flight_share.audit" in log
    for secret in SECRETS:
        assert secret not in log
    assert "eyJ" not in log and "Traceback" not in log
