"""Statement handles and statement tickets: the statement itself (SQL, bound values, a partition of its
table), sealed by the server, so that it keeps no per-statement state; every use checks the statement
again under the caller's profile.

Two kinds, told apart by their prefix:

- a *handle* (``flight-share/statement/v1:``, :func:`encode_handle`): what CreatePreparedStatement and a
  bind (DoPut) answer. It carries the SQL and any bound values (the values sealed: only values this server
  checked and wrote are ever decoded again). It does not expire: a client keeps a prepared statement as long
  as it likes, and every use plans the statement anew, reading the tables as they are then.
- a *ticket* (``flight-share/ticket/v1:``, :func:`encode_ticket`): the ``statement_handle`` of a
  ``TicketStatementQuery`` that GetFlightInfo answers. It carries the statement, a run id and, for one
  endpoint of a split result, the partition of the statement's table that the endpoint reads; it is a signed
  ticket exactly like a plain DoGet ticket (:class:`~flight_server.transport.tickets.TicketSigner`): bound to
  the caller it was issued to and valid for ``server.ticket_ttl`` seconds. An expired ticket, or another
  caller's, is refused (INVALID_ARGUMENT: run the query again), so an old partition cannot be read after the
  ttl, by anyone. Within the ttl a ticket reads what it was planned on - a snapshot: a Delta partition names
  the files of the table version the statement was planned on, and reads them even if the owner replaced the
  table since (as plain endpoints do, README "Parallel endpoints").
"""

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
from flight_server.transport.decode import check_text
from flight_server.transport.tickets import TicketExpired, TicketNotYours, TicketSigner

_HANDLE_PREFIX = b"flight-share/statement/v1:"
_TICKET_PREFIX = b"flight-share/ticket/v1:"
_NOT_OURS = "not a statement handle issued by this server"


@dataclass(frozen=True)
class Statement:
    """What a statement handle or ticket carries: the SQL and the values bound to it (and in a ticket, its run
    and partition).

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
    # statement's one table that this endpoint reads (signed with the statement, see encode_ticket)
    partition: dict[str, Any] | None = None

    def values(self) -> pa.Table | None:
        """The bound values as a table, or None when nothing is bound."""
        if self.parameters is None:
            return None
        try:
            values = pa.ipc.open_stream(pa.py_buffer(self.parameters)).read_all()
            values.validate(full=True)
        except (pa.ArrowException, ValueError):
            raise InvalidRequest(f"{_NOT_OURS} (its bound values do not decode)") from None
        return values


_SEAL_PURPOSE = b"statement handle values"
#: the largest partition spec a ticket carries (a Delta partition names its files); a table whose
#: partitions name more is answered as one endpoint
MAX_PARTITION_BYTES = 256 << 10


def _body(statement: Statement) -> dict[str, Any]:
    body: dict[str, Any] = {"query": statement.query}
    if statement.run is not None:
        body["run"] = statement.run
    if statement.parameters is not None:
        body["parameters"] = base64.b64encode(statement.parameters).decode()
    if statement.partition is not None:
        body["partition"] = statement.partition
    return body


def encode_handle(statement: Statement, signer: TicketSigner) -> bytes:
    """A (prepared) statement handle; its bound values are sealed (only values this server checked and wrote
    are ever decoded again: a forged handle could carry a compressed stream that inflates to gigabytes).
    A handle carries no run and no partition: those are a ticket's (:func:`encode_ticket`)."""
    if statement.run is not None or statement.partition is not None:
        raise ValueError("a statement handle carries no run or partition; make a ticket (encode_ticket)")
    body = _body(statement)
    if statement.parameters is not None:
        body["seal"] = base64.b64encode(signer.seal(_SEAL_PURPOSE, _sealed(statement))).decode()
    return _HANDLE_PREFIX + json.dumps(body).encode()


def encode_ticket(statement: Statement, signer: TicketSigner, user: str) -> tuple[bytes, float]:
    """The ``statement_handle`` of a ``TicketStatementQuery`` for ``user``, and its expiry (unix seconds): the
    statement (its values, run and partition) signed as a DoGet ticket is, so that only this server's replicas
    make one, only ``user`` reads it, and only for ``server.ticket_ttl`` seconds (only partitions this server
    planned, for this statement over this dataset's table, ever reach a storage adapter: a forged one could
    name any file)."""
    ticket, expires = signer.sign(json.dumps(_body(statement)).encode(), user)
    return _TICKET_PREFIX + ticket, expires


def _sealed(statement: Statement) -> bytes:
    return statement.query.encode("utf-8") + b"\0" + (statement.parameters or b"")


def canonical(value: Any) -> bytes:
    """``value`` as JSON in one spelling (sorted keys, no spaces): its size in a ticket."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# a handle: the statement in JSON (a character escaped as \uXXXX takes up to 12 bytes), bound values in
# base64 (4/3 of their size, plus IPC framing), and a partition (escaped like the statement)
_MAX_HANDLE_BYTES = MAX_QUERY_CHARS * 12 + MAX_PARAMETER_BYTES * 3 // 2 + MAX_PARTITION_BYTES * 6 + 1024
# a ticket: that handle as a JSON string (escaping at most doubles it), in base64 (4/3), plus user and expiry
_MAX_TICKET_BYTES = _MAX_HANDLE_BYTES * 3 + 1024


def _partition_of(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not (isinstance(value, dict) and set(value) == {"dataset", "table", "spec"} and isinstance(value["dataset"], str)
            and isinstance(value["table"], str) and isinstance(value["spec"], dict)):
        raise TypeError
    return value


def _statement_of(text: bytes, keys: frozenset[str]) -> tuple[Statement, bytes]:
    """The statement in a handle's or ticket's JSON (only ``keys`` allowed), and its seal (empty if none)."""
    try:
        body = json.loads(text)
        if not isinstance(body, dict) or not set(body) <= keys:
            raise TypeError
        query, parameters, seal, run = body["query"], body.get("parameters"), body.get("seal"), body.get("run")
        if not isinstance(query, str) or not isinstance(parameters, (str, type(None))) \
                or not isinstance(seal, (str, type(None))) \
                or not (run is None or (isinstance(run, str) and len(run) <= 64)):
            raise TypeError
        partition = _partition_of(body.get("partition"))
        raw = base64.b64decode(parameters, validate=True) if parameters is not None else None
        sealed = base64.b64decode(seal, validate=True) if seal is not None else b""
    except (ValueError, KeyError, TypeError, RecursionError, binascii.Error):
        raise InvalidRequest(_NOT_OURS) from None
    check_text(query, "the statement's query")  # a handle is JSON: a lone surrogate (\ud800) is valid there
    return Statement(query, raw, run, partition), sealed


def decode_handle(handle: bytes, signer: TicketSigner) -> Statement:
    """The statement of a handle :func:`encode_handle` made; anything else (or a broken seal) is refused."""
    if not handle.startswith(_HANDLE_PREFIX) or len(handle) > _MAX_HANDLE_BYTES:
        raise InvalidRequest(_NOT_OURS)
    statement, sealed = _statement_of(handle[len(_HANDLE_PREFIX):], frozenset({"query", "parameters", "seal"}))
    if statement.parameters is not None and not signer.opens(_SEAL_PURPOSE, _sealed(statement), sealed):
        raise InvalidRequest(f"{_NOT_OURS} (its bound values are not sealed by it)")
    return statement


def decode_ticket(ticket: bytes, signer: TicketSigner, user: str, now: float | None = None) -> Statement:
    """The statement of a ticket :func:`encode_ticket` made for ``user`` that has not expired; anything else
    is refused (INVALID_ARGUMENT: the same ticket can never work again, the query run anew can)."""
    if not ticket.startswith(_TICKET_PREFIX):
        raise InvalidRequest(f"{_NOT_OURS}; a statement's ticket comes from GetFlightInfo")
    try:
        text = signer.open(ticket[len(_TICKET_PREFIX):], user, now, limit=_MAX_TICKET_BYTES)
    except TicketExpired:
        raise InvalidRequest(f"this result's ticket has expired (they are valid for {signer.ttl} s, "
                             "server.ticket_ttl); run the query again", limit="server.ticket_ttl",
                             value=signer.ttl) from None
    except TicketNotYours:
        raise InvalidRequest("this result's ticket was issued to another caller; run the query yourself "
                             "for a ticket of your own") from None
    except InvalidRequest:
        raise InvalidRequest(_NOT_OURS) from None
    return _statement_of(text, frozenset({"query", "parameters", "run", "partition"}))[0]


def a_run_of(statement: Statement) -> Statement:
    """The statement with a fresh run id, for the tickets of one GetFlightInfo."""
    return dataclasses.replace(statement, run=secrets.token_urlsafe(12))


def ipc_stream(values: pa.Table) -> bytes:
    """Bound values as a handle carries them: one Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, values.schema) as writer:
        writer.write_table(values)
    return sink.getvalue().to_pybytes()
