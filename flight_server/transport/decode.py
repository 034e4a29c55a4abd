"""The one decoder: what a Flight request asks for, whichever surface it speaks.

Every RPC's payload - a descriptor, a ticket, an action - becomes a :class:`Request`: the RPC, a
``kind`` that keys the server's one dispatch table, and the decoded message. flight-share's own JSON
commands (:mod:`client.protocol`) have the kinds ``read``, ``sql`` and ``write``; a Flight SQL
``google.protobuf.Any`` has the short name of its message (``CommandStatementQuery``...); an action
has its type (``list-datasets``, ``CreatePreparedStatement``...). Decoding checks the form only; who
may do what is the handlers' business.

Text is UTF-8 everywhere: a JSON command may spell a lone UTF-16 surrogate (``"\\ud800"``, valid JSON), which
decodes to a Python string that no name, query, library or status message can take, so :func:`check_text`
refuses it here, in any key or value, nested. Flight SQL's strings are protobuf ``string`` fields, whose
parser refuses what is not UTF-8.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow.flight as flight
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from client import protocol
from client.protocol import ReadCommand, SqlCommand, WriteCommand
from flight_server._vendor import FlightSql_pb2 as pb
from flight_server._vendor import flight_messages as fm
from flight_server.domain.errors import InvalidRequest

TYPE_URL_PREFIX = "type.googleapis.com/"
SQL_PACKAGE = "arrow.flight.protocol.sql."

# Flight SQL (and Flight session) action names; their bodies are Any-packed messages
FLIGHT_SQL_ACTIONS = frozenset({
    "CreatePreparedStatement", "ClosePreparedStatement", "CreatePreparedSubstraitPlan",
    "BeginTransaction", "BeginSavepoint", "EndTransaction", "EndSavepoint", "CancelQuery",
    "CancelFlightInfo", "RenewFlightEndpoint", "SetSessionOptions", "GetSessionOptions", "CloseSession",
})
# the message a Flight SQL action's body carries, where this server answers the action
ACTION_BODIES: dict[str, type[Message]] = {
    "CreatePreparedStatement": pb.ActionCreatePreparedStatementRequest,
    "ClosePreparedStatement": pb.ActionClosePreparedStatementRequest,
}
# Flight's session actions: their bodies are the serialised messages themselves (not packed in Any)
RAW_ACTION_BODIES: dict[str, type[Message]] = {
    "SetSessionOptions": fm.SetSessionOptionsRequest,
    "GetSessionOptions": fm.GetSessionOptionsRequest,
    "CloseSession": fm.CloseSessionRequest,
    "CancelFlightInfo": fm.CancelFlightInfoRequest,
}
# what a client reads in messages: the gRPC method names
RPC_NAMES = {"get_flight_info": "GetFlightInfo", "get_schema": "GetSchema", "do_get": "DoGet",
             "do_put": "DoPut", "do_action": "DoAction", "do_exchange": "DoExchange",
             "list_flights": "ListFlights", "list_actions": "ListActions"}


@dataclass(frozen=True)
class Request:
    """One decoded request: ``(rpc, kind)`` picks its handler."""

    rpc: str
    kind: str
    message: Any = None  # a protocol Command, a Flight SQL message, an action body or ListFlights criteria
    flight_sql: bool = False

    @property
    def dataset(self) -> str | None:
        """The dataset the request names, for the audit line and cache eviction."""
        if isinstance(self.message, (ReadCommand, SqlCommand, WriteCommand)):
            return self.message.dataset
        if isinstance(self.message, pb.CommandStatementIngest) and self.message.HasField("schema"):
            return self.message.schema
        return None

    @property
    def table(self) -> str | None:
        if isinstance(self.message, (ReadCommand, WriteCommand)):
            return self.message.table
        if isinstance(self.message, pb.CommandStatementIngest):
            return self.message.table
        return None

    @property
    def writes(self) -> bool:
        """Whether the request saves data (the hot-table cache of its dataset is dropped after it)."""
        return self.kind in ("write", "CommandStatementIngest")


def check_text(value: Any, what: str) -> None:
    """Refuse ``value`` - a string, or lists, tuples, mappings (keys too) and dataclasses of them, nested - if
    any of its text cannot be UTF-8 (a lone surrogate, as a JSON ``\\ud800`` escape makes): INVALID_ARGUMENT
    naming ``what`` and the character, never a library's encoding error later."""
    stack = [value]
    while stack:  # not recursive: a command's JSON may be nested as deeply as json allows
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidRequest(f"{what} is not text: it holds \\u{ord(item[exc.start]):04x}, a lone UTF-16 "
                                     "surrogate (half of a pair); send Unicode text, as UTF-8") from None
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))


def _command(data: bytes) -> protocol.Command:
    """One of flight-share's JSON commands, its text UTF-8 throughout."""
    command = protocol.decode_command(data)
    for key in dataclasses.fields(command):
        check_text(getattr(command, key.name), f"command key '{key.name}'")
    return command


def short_name(url: str) -> str:
    """``type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery`` -> ``CommandStatementQuery``."""
    return url.rsplit("/", 1)[-1].removeprefix(SQL_PACKAGE)


def unpack_any(data: bytes) -> any_pb2.Any | None:
    """The ``Any`` in ``data``, or None if ``data`` is not one (our JSON commands start with ``{``)."""
    if not data or data[:1] != b"\n":
        return None
    try:
        wrapped = any_pb2.Any.FromString(data)
    except DecodeError:
        return None
    return wrapped if wrapped.type_url.startswith(TYPE_URL_PREFIX) else None


def _flight_sql(rpc: str, wrapped: any_pb2.Any) -> Request:
    """A Flight SQL message; an unknown one decodes to its name only (the dispatch says UNIMPLEMENTED)."""
    name = short_name(wrapped.type_url)
    cls = (getattr(pb, name, None) or getattr(fm, name, None)) if wrapped.type_url.startswith(TYPE_URL_PREFIX + SQL_PACKAGE) else None
    if not (isinstance(cls, type) and issubclass(cls, Message)):
        return Request(rpc, name, None, flight_sql=True)
    message = cls()
    try:
        message.ParseFromString(wrapped.value)
    except DecodeError as exc:  # protobuf's parser also refuses a string field that is not UTF-8
        text = " (a text field is not UTF-8)" if "UTF-8" in str(exc) else ""
        raise InvalidRequest(f"Flight SQL {name} does not decode{text}") from None
    return Request(rpc, name, message, flight_sql=True)


def descriptor(rpc: str, descriptor: flight.FlightDescriptor) -> Request:
    """GetFlightInfo, GetSchema, DoPut: a path ``[dataset, table]``, a JSON command or a Flight SQL command."""
    if descriptor.descriptor_type == flight.DescriptorType.PATH:
        command = protocol.command_from_path(descriptor.path, "write" if rpc == "do_put" else "read")
        return Request(rpc, command.op, command)
    wrapped = unpack_any(descriptor.command)
    if wrapped is not None:
        return _flight_sql(rpc, wrapped)
    command = _command(descriptor.command)
    return Request(rpc, command.op, command)


def ticket(data: bytes, open_signed: Callable[[bytes], bytes]) -> Request:
    """DoGet: a Flight SQL ticket, or one of ours (signed for its caller: ``open_signed`` checks it)."""
    wrapped = unpack_any(data)
    if wrapped is not None:
        return _flight_sql("do_get", wrapped)
    command = _command(open_signed(data))
    return Request("do_get", command.op, command)


def action(act: flight.Action) -> Request:
    """DoAction: ours take a JSON body (``list-datasets``: decoded; others: bytes as sent); Flight SQL's an
    Any-packed message."""
    body = act.body.to_pybytes() if act.body is not None else b""
    if act.type == protocol.ACTION_LIST_DATASETS:
        listing = protocol.ListDatasetsRequest.from_bytes(body)
        check_text(listing.datasets, "a dataset name in the list-datasets body")
        return Request("do_action", act.type, listing)
    if act.type not in FLIGHT_SQL_ACTIONS:
        return Request("do_action", act.type, body)
    raw = RAW_ACTION_BODIES.get(act.type)
    if raw is not None:
        try:
            return Request("do_action", act.type, raw.FromString(body), flight_sql=True)
        except DecodeError:
            raise InvalidRequest(f"Flight action {act.type} takes a {raw.DESCRIPTOR.name}") from None
    expected = ACTION_BODIES.get(act.type)
    if expected is None:
        return Request("do_action", act.type, None, flight_sql=True)
    wrapped = unpack_any(body)
    if wrapped is None or short_name(wrapped.type_url) != expected.DESCRIPTOR.name:
        raise InvalidRequest(f"Flight SQL action {act.type} takes a {expected.DESCRIPTOR.name} packed in "
                             "google.protobuf.Any")
    request = _flight_sql("do_action", wrapped)
    return Request("do_action", act.type, request.message, flight_sql=True)
