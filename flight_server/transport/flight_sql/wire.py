"""What every part of the Flight SQL surface shares: the handler type, a message packed in
``google.protobuf.Any``, a FlightInfo of one endpoint, and the refusal of transactions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf import any_pb2
from google.protobuf.message import Message

from flight_server.domain.errors import Unsupported
from flight_server.transport.call import Call
from flight_server.transport.decode import Request

Handler = Callable[[Call, Request], Any]
# (RPC, message name) -> handler: each part's share of the server's one dispatch table
Routes = dict[tuple[str, str], Handler]


def pack(message: Message) -> bytes:
    """``message`` in a serialised ``google.protobuf.Any``."""
    wrapped = any_pb2.Any()
    wrapped.Pack(message)
    return wrapped.SerializeToString()


def one_endpoint_info(schema: pa.Schema, descriptor: flight.FlightDescriptor, ticket: bytes) -> flight.FlightInfo:
    """A FlightInfo whose one endpoint is ``ticket``, on this server; row and byte counts unknown."""
    return flight.FlightInfo(schema, descriptor, [flight.FlightEndpoint(ticket, [])], -1, -1)


def no_transaction(command: Any) -> None:
    """Refuse a command that names a transaction: statements and ingests run on their own."""
    if command.HasField("transaction_id"):
        raise Unsupported("transactions are not supported; statements run on their own")
