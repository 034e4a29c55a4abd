"""Statement handles: the statement itself (SQL, bound values, a partition of its table), sealed by the
server, so that it keeps no per-statement state; every use checks the statement again under the
caller's profile."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import secrets
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from flight_server.domain.errors import InvalidRequest
from flight_server.domain.sql.parameters import MAX_PARAMETER_BYTES
from flight_server.domain.sql.parse import MAX_QUERY_CHARS
from flight_server.transport.tickets import TicketSigner

_HANDLE_PREFIX = b"flight-share/statement/v1:"


@dataclass(frozen=True)
class Statement:
    """What a statement or prepared statement handle carries: the SQL and the values bound to it.

    ``parameters`` is an Arrow IPC stream (one column per parameter, one row per execution), at most
    :data:`MAX_PARAMETER_BYTES` long, sealed by the server (:func:`encode_handle`). Handles are not secret:
    the statement is checked again on every use, under the caller's profile, exactly like one sent in the clear.
    """

    query: str
    parameters: bytes | None = None
    # a random id in the tickets GetFlightInfo hands out: CancelFlightInfo stops a running DoGet only for
    # the one who holds its ticket (the same SQL from another caller of the same user is another run)
    run: str | None = None
    # the ticket of one endpoint of a split result: {"dataset", "table", "spec"} - the partition of the
    # statement's one table that this endpoint reads (sealed with the statement, see encode_handle)
    partition: dict[str, Any] | None = None

    def values(self) -> pa.Table | None:
        """The bound values as a table, or None when nothing is bound."""
        if self.parameters is None:
            return None
        try:
            values = pa.ipc.open_stream(pa.py_buffer(self.parameters)).read_all()
            values.validate(full=True)
        except (pa.ArrowException, ValueError):
            raise InvalidRequest("not a statement handle issued by this server (its bound values do not decode)") from None
        return values


_SEAL_PURPOSE = b"statement handle values"
_PARTITION_SEAL_PURPOSE = b"statement handle partition"
#: the largest partition spec a ticket carries (a Delta partition names its files); a table whose
#: partitions name more is answered as one endpoint
MAX_PARTITION_BYTES = 256 << 10


def encode_handle(statement: Statement, signer: TicketSigner) -> bytes:
    """A handle for the statement; bound values and a partition are sealed (only values this server checked
    and wrote are ever decoded again: a forged handle could carry a compressed stream that inflates to
    gigabytes; and only partitions this server planned, for this statement over this dataset's table,
    ever reach a storage adapter: a forged one could name any file)."""
    body: dict[str, Any] = {"query": statement.query}
    if statement.run is not None:
        body["run"] = statement.run
    if statement.parameters is not None:
        body["parameters"] = base64.b64encode(statement.parameters).decode()
    if statement.partition is not None:
        body["partition"] = statement.partition
        body["seal"] = base64.b64encode(signer.seal(_PARTITION_SEAL_PURPOSE, _sealed(statement))).decode()
    elif statement.parameters is not None:
        body["seal"] = base64.b64encode(signer.seal(_SEAL_PURPOSE, _sealed(statement))).decode()
    return _HANDLE_PREFIX + json.dumps(body).encode()


def _sealed(statement: Statement) -> bytes:
    query, values = statement.query.encode("utf-8", "surrogatepass"), statement.parameters or b""
    if statement.partition is None:
        return query + b"\0" + values
    # the values' length first, so no other split of the bytes between values and partition reads the same
    return query + b"\0" + str(len(values)).encode() + b"\0" + values + b"\0" + canonical(statement.partition)


def canonical(value: Any) -> bytes:
    """``value`` as JSON in one spelling (sorted keys, no spaces): what a seal covers."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# a handle: the statement in JSON (a character escaped as \uXXXX takes up to 12 bytes), bound values in
# base64 (4/3 of their size, plus IPC framing), and a partition (escaped like the statement)
_MAX_HANDLE_BYTES = MAX_QUERY_CHARS * 12 + MAX_PARAMETER_BYTES * 3 // 2 + MAX_PARTITION_BYTES * 6 + 1024


def _partition_of(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not (isinstance(value, dict) and set(value) == {"dataset", "table", "spec"} and isinstance(value["dataset"], str)
            and isinstance(value["table"], str) and isinstance(value["spec"], dict)):
        raise TypeError
    return value


def decode_handle(handle: bytes, signer: TicketSigner) -> Statement:
    """The statement of a handle :func:`encode_handle` made; anything else (or a broken seal) is refused."""
    if not handle.startswith(_HANDLE_PREFIX) or len(handle) > _MAX_HANDLE_BYTES:
        raise InvalidRequest("not a statement handle issued by this server")
    try:
        body = json.loads(handle[len(_HANDLE_PREFIX):])
        query, parameters, seal, run = body["query"], body.get("parameters"), body.get("seal"), body.get("run")
        if not isinstance(query, str) or not isinstance(parameters, (str, type(None))) \
                or not (run is None or (isinstance(run, str) and len(run) <= 64)):
            raise TypeError
        partition = _partition_of(body.get("partition"))
        raw = base64.b64decode(parameters, validate=True) if parameters is not None else None
        sealed = base64.b64decode(seal, validate=True) if isinstance(seal, str) else b""
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidRequest("not a statement handle issued by this server") from None
    statement = Statement(query, raw, run, partition)
    if partition is not None:
        if not signer.opens(_PARTITION_SEAL_PURPOSE, _sealed(statement), sealed):
            raise InvalidRequest("not a statement handle issued by this server (its partition is not sealed by it)")
    elif raw is not None and not signer.opens(_SEAL_PURPOSE, _sealed(statement), sealed):
        raise InvalidRequest("not a statement handle issued by this server (its bound values are not sealed by it)")
    return statement


def a_run_of(statement: Statement) -> Statement:
    """The statement with a fresh run id, for the ticket of one GetFlightInfo."""
    return dataclasses.replace(statement, run=secrets.token_urlsafe(12))


def ipc_stream(values: pa.Table) -> bytes:
    """Bound values as a handle carries them: one Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, values.schema) as writer:
        writer.write_table(values)
    return sink.getvalue().to_pybytes()
