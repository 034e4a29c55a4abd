"""One structured audit line per call: who, under which profile, did what, to which data, with what outcome.

Each RPC gets an :class:`AuditRecord` when the call middleware (:mod:`flight_server.transport.auth`) starts it;
the dispatch fills in the dataset and table (:func:`annotate`); SQL results count rows and bytes as
they leave (:func:`counted`) and saves note what they stored - table reads go to Flight as C++
streams, uncounted (GetFlightInfo's ``total_records`` says how many). The middleware's
``call_completed`` writes the record as one JSON line to the ``flight_share.audit`` logger — also
for calls refused before any handler ran::

    {"time": "2026-11-03T10:00:00.123Z", "user": "alice", "profile": "analysts", "rpc": "do_put",
     "dataset": "reports_dataset", "table": "aggregated_issues", "rows": 120, "bytes": 51234,
     "outcome": "ok", "peer": "ipv4:127.0.0.1:50512", "ms": 4.2, "login": null}

``outcome`` is ``ok``, the gRPC status name (``UNAUTHENTICATED``, ``NOT_FOUND`` ...), or
``CANCELLED`` for a stream the client left before its end. ``bytes`` is the Arrow in-memory size
of the batches sent. ``login`` is the user name a refused login tried (printable characters only, at most
:data:`MAX_LOGIN_CHARS`; null otherwise), with ``user`` null; ``peer`` is the caller's address, for every call
but a Handshake (pyarrow does not tell the Handshake its peer). Nothing secret is written: no tokens, no
passwords, no query parameters.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

log = logging.getLogger("flight_share.audit")

#: key of the call middleware in ``context.get_middleware``
MIDDLEWARE_KEY = "flight-share"
MAX_LOGIN_CHARS = 128  # as long as a user name may be


def sanitise(text: str, limit: int = MAX_LOGIN_CHARS) -> str:
    """Caller-chosen text fit for a log line: unprintable characters as ``?``, at most ``limit`` characters
    (longer text ends in ``...``)."""
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit + 1])
    return clean if len(clean) <= limit else clean[:limit - 3] + "..."

_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (flight.FlightUnauthenticatedError, "UNAUTHENTICATED"),
    (flight.FlightUnauthorizedError, "PERMISSION_DENIED"),
    (flight.FlightCancelledError, "CANCELLED"),
    (flight.FlightUnavailableError, "UNAVAILABLE"),
    (flight.FlightTimedOutError, "DEADLINE_EXCEEDED"),
    (flight.FlightInternalError, "INTERNAL"),
    (flight.FlightServerError, "UNKNOWN"),
    (KeyError, "NOT_FOUND"),
    (pa.ArrowKeyError, "NOT_FOUND"),
    (NotImplementedError, "UNIMPLEMENTED"),
    (pa.ArrowNotImplementedError, "UNIMPLEMENTED"),
    (ValueError, "INVALID_ARGUMENT"),
    (pa.ArrowInvalid, "INVALID_ARGUMENT"),
)


def status_name(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    return next((name for kind, name in _CODES if isinstance(exc, kind)), "UNKNOWN")


@dataclass
class AuditRecord:
    """What one call did; written once when the call ends."""

    rpc: str
    peer: str = ""
    user: str | None = None
    profile: str | None = None
    dataset: str | None = None
    table: str | None = None
    rows: int | None = None
    bytes: int | None = None
    outcome: str = "ok"
    login: str | None = None  # the user name a refused login tried (sanitised)
    started: float = field(default_factory=time.monotonic)
    stream_open: bool = False  # a counted stream started and has not reached its end
    written: bool = False

    def finish(self, exception: BaseException | None) -> None:
        self.outcome = status_name(exception)
        if exception is None and self.stream_open:
            self.outcome = "CANCELLED"

    def to_json(self) -> str:
        body: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "user": self.user,
            "profile": self.profile,
            "rpc": self.rpc,
            "dataset": self.dataset,
            "table": self.table,
            "rows": self.rows,
            "bytes": self.bytes,
            "outcome": self.outcome,
            "peer": self.peer,
            "ms": round((time.monotonic() - self.started) * 1000, 1),
            "login": self.login,
        }
        return json.dumps(body, ensure_ascii=True, default=str)

    def write(self) -> None:
        if not self.written:
            self.written = True
            log.info(self.to_json())


def rpc_name(method: Any) -> str:
    """``FlightMethod.DO_GET`` -> ``do_get``."""
    return getattr(method, "name", str(method)).lower()


def record_of(context: flight.ServerCallContext) -> AuditRecord | None:
    middleware = context.get_middleware(MIDDLEWARE_KEY)
    return getattr(middleware, "record", None)


def annotate(context: flight.ServerCallContext, dataset: str | None = None, table: str | None = None) -> None:
    """Note which data a call is about (names are truncated: they come from the caller)."""
    record = record_of(context)
    if record is not None:
        if dataset is not None:
            record.dataset = dataset[:256]
        if table is not None:
            record.table = table[:256]


def counted(context: flight.ServerCallContext, reader: pa.RecordBatchReader,
            map_error: Callable[[Exception], BaseException]) -> pa.RecordBatchReader:
    """The same stream, counting rows and bytes into the call's audit record as batches leave, with an
    error raised while it is read passed through ``map_error`` (inside a stream pyarrow maps only Python
    built-ins to statuses). One Python generator per stream does both."""
    record = record_of(context)
    if record is not None:
        record.rows = record.bytes = 0
        record.stream_open = True

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            for batch in reader:
                if record is not None:
                    record.rows = (record.rows or 0) + batch.num_rows
                    record.bytes = (record.bytes or 0) + batch.nbytes
                yield batch
            if record is not None:
                record.stream_open = False
        except Exception as exc:  # noqa: BLE001 - not GeneratorExit: a client that left has nothing to hear
            raise map_error(exc) from None
        finally:
            reader.close()

    return pa.RecordBatchReader.from_batches(reader.schema, batches())
