"""What every part of the Flight SQL surface shares: the handler type, a message packed in
``google.protobuf.Any``, an endpoint and a FlightInfo of one, and the refusal of transactions."""

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


def one_endpoint_info(schema: pa.Schema, descriptor: flight.FlightDescriptor, ticket: bytes,
                      expires: float | None = None) -> flight.FlightInfo:
    """A FlightInfo whose one endpoint is ``ticket``, on this server (valid until ``expires``, unix seconds, if
    given); row and byte counts unknown."""
    return flight.FlightInfo(schema, descriptor, [an_endpoint(ticket, [], expires)], -1, -1)


def an_endpoint(ticket: bytes, locations: list[Any], expires: float | None = None) -> flight.FlightEndpoint:
    """An endpoint of ``ticket`` at ``locations`` (none: this server), saying its expiry if it has one."""
    if expires is None:
        return flight.FlightEndpoint(ticket, locations)
    return flight.FlightEndpoint(ticket, locations, pa.scalar(int(expires * 1_000_000), pa.timestamp("us", tz="UTC")))


def no_transaction(command: Any) -> None:
    """Refuse a command that names a transaction: statements and ingests run on their own."""
    if command.HasField("transaction_id"):
        raise Unsupported("transactions are not supported; statements run on their own")
