"""The one table that turns errors into Flight statuses (every RPC and stream leaves through it).

Domain errors (:mod:`flight_server.domain.errors`) map by class; a query engine refusing the caller's SQL is
INVALID_ARGUMENT; anything else is INTERNAL with a generic text (the traceback goes to the server log
only). Every message and detail leaves masked (credentials as ``***``, :mod:`flight_server.domain.masking`)
and at most :data:`MAX_MESSAGE_CHARS` long (messages echo names the caller sent).
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow.flight as flight

from client.protocol import ErrorDetail, ProtocolError
from flight_server.domain.errors import (
    Cancelled,
    Forbidden,
    InvalidRequest,
    MemoryLimitExceeded,
    NotFound,
    ServiceError,
    Unauthenticated,
    Unavailable,
    Unsupported,
)
from flight_server.domain.masking import mask

log = logging.getLogger("flight_share.server")

MAX_MESSAGE_CHARS = 2000


# gRPC NOT_FOUND / INVALID_ARGUMENT / UNIMPLEMENTED have no pyarrow Flight exception class, so they
# are raised as the Python built-ins pyarrow maps to those codes. ``__str__`` returns the plain text
# (KeyError would otherwise quote it). pyarrow then appends ". Detail: " and what
# ``traceback.format_exception`` makes of the exception - the server's traceback and the whole text
# again (clients that show the gRPC message printed every error twice, with file names). When that
# formatting fails, pyarrow falls back to the exception's type name (``PythonErrorDetail::ToString``
# in pyarrow's ``common.cc``): so these exceptions refuse to be formatted (``__notes__`` raises, which
# ``traceback.TracebackException`` does not swallow), and the detail reads "Python exception:
# InvalidArgument". No process-wide ``sys.tracebacklimit`` is needed. The names are what a client
# reads, so they say the status, not where the server keeps its classes.
class _Unformattable(Exception):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    # read-only on purpose: reading it must fail (see above)
    @property
    def __notes__(self) -> Any:  # type: ignore[override]
        raise LookupError("a wire error carries no traceback")


class _WireNotFound(_Unformattable, KeyError):
    pass


class _WireInvalid(_Unformattable, ValueError):
    pass


class _WireUnimplemented(_Unformattable, NotImplementedError):
    pass


# pyarrow's Flight classes as they leave: unformattable too. Every RPC but GetSchema turns a FlightError into
# its status itself; GetSchema's wrapper (``_get_schema`` in pyarrow's ``_flight.pyx``) has no such ``except``
# and formats whatever it raises as any Python error - the traceback with the server's file names, under
# UNKNOWN. These leave GetSchema as UNKNOWN too (its wrapper knows no other code for them), with their own
# text and their status's name, and no traceback.
class _WireInternal(_Unformattable, flight.FlightInternalError):
    pass


class _WireTimedOut(_Unformattable, flight.FlightTimedOutError):
    pass


class _WireCancelled(_Unformattable, flight.FlightCancelledError):
    pass


class _WireUnauthenticated(_Unformattable, flight.FlightUnauthenticatedError):
    pass


class _WirePermissionDenied(_Unformattable, flight.FlightUnauthorizedError):
    pass


class _WireUnavailable(_Unformattable, flight.FlightUnavailableError):
    pass


class _WireFailed(_Unformattable, flight.FlightServerError):
    pass


for _cls, _name in ((_WireNotFound, "NotFound"), (_WireInvalid, "InvalidArgument"), (_WireUnimplemented, "Unimplemented"),
                    (_WireInternal, "Internal"), (_WireTimedOut, "TimedOut"), (_WireCancelled, "Cancelled"),
                    (_WireUnauthenticated, "Unauthenticated"), (_WirePermissionDenied, "PermissionDenied"),
                    (_WireUnavailable, "Unavailable"), (_WireFailed, "Failed")):
    _cls.__module__, _cls.__name__, _cls.__qualname__ = "builtins", _name, _name

# most derived first: FlightServerError is the base of Internal, TimedOut and Cancelled
_FLIGHT_TWINS: tuple[tuple[type[flight.FlightError], type[flight.FlightError]], ...] = (
    (flight.FlightInternalError, _WireInternal), (flight.FlightTimedOutError, _WireTimedOut),
    (flight.FlightCancelledError, _WireCancelled), (flight.FlightUnauthenticatedError, _WireUnauthenticated),
    (flight.FlightUnauthorizedError, _WirePermissionDenied), (flight.FlightUnavailableError, _WireUnavailable),
    (flight.FlightServerError, _WireFailed),
)
_WIRE: tuple[type[BaseException], ...] = (_WireNotFound, _WireInvalid, _WireUnimplemented,
                                          *(twin for _, twin in _FLIGHT_TWINS))


def _unformattable(exc: flight.FlightError) -> BaseException:
    """A FlightError raised as it is (ours, or a library's) in its unformattable twin: same status, text
    and extra_info, no traceback on GetSchema."""
    for cls, twin in _FLIGHT_TWINS:
        if isinstance(exc, cls):
            return twin(_text(str(exc)), getattr(exc, "extra_info", b""))
    return _WireFailed(_text(str(exc)), getattr(exc, "extra_info", b""))


def _engine_rejected_query(exc: BaseException) -> bool:
    """A query engine refusing the caller's SQL (unknown column, type mismatch, ...): a client mistake."""
    try:
        import duckdb
    except ImportError:  # pragma: no cover - duckdb is a server dependency
        return False
    return isinstance(exc, (duckdb.BinderException, duckdb.CatalogException, duckdb.ParserException,
                            duckdb.ConversionException, duckdb.InvalidInputException, duckdb.OutOfRangeException,
                            duckdb.TypeMismatchException, duckdb.NotImplementedException))

def _text(message: str) -> str:
    # a lone surrogate (from a JSON "\\ud800" the message echoes) cannot become the status's UTF-8: escaped
    text = mask(message).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "... (truncated)"


def _detail(exc: ServiceError) -> bytes:
    fields = {k: (_text(v) if isinstance(v, str) else v) for k, v in exc.fields.items()}
    return mask.bytes(ErrorDetail(type(exc).__name__, _text(exc.message), fields).to_bytes())


def over_memory_limit(upload: bool = True) -> MemoryLimitExceeded:
    """An allocation refused by the process's Arrow memory ceiling (or an upload batch refused to keep
    clear of it), in the user's terms."""
    from flight_server.transport import memory

    limit = memory.active_limit()
    where = f" ({limit / (1 << 20):,.0f} MiB, server.memory_limit)" if limit else ""
    advice = (": send smaller batches (a compressed batch counts at its decompressed size; one may take at "
              "most an eighth of the limit)") if upload else "; retry later or ask for less"
    return MemoryLimitExceeded(f"the request needs more memory than the server allows{where}{advice}",
                               limit="server.memory_limit", value=limit)


def to_flight_error(exc: BaseException) -> BaseException:
    """Map any exception raised in a handler to what the client may see: an exception pyarrow cannot format
    (no traceback reaches a client, from any RPC), with a text that is UTF-8."""
    if isinstance(exc, _WIRE):
        return exc
    if isinstance(exc, flight.FlightError):
        return _unformattable(exc)
    if isinstance(exc, MemoryError):  # pa.ArrowMemoryError too: the Arrow pool's ceiling (transport/memory.py)
        exc = over_memory_limit(upload=False)
    if isinstance(exc, NotFound):
        return _WireNotFound(_text(exc.message))
    if isinstance(exc, (InvalidRequest, ProtocolError)):
        return _WireInvalid(_text(str(exc)))
    if _engine_rejected_query(exc):
        return _WireInvalid(_text(f"the query was rejected: {str(exc).splitlines()[0]}"))
    if isinstance(exc, Unsupported):
        return _WireUnimplemented(_text(exc.message))
    if isinstance(exc, Forbidden):
        return _WirePermissionDenied(_text(exc.message), _detail(exc))
    if isinstance(exc, Unauthenticated):
        return _WireUnauthenticated(_text(exc.message), _detail(exc))
    if isinstance(exc, Unavailable):
        return _WireUnavailable(_text(exc.message), _detail(exc))
    if isinstance(exc, Cancelled):
        return _WireCancelled(_text(exc.message), _detail(exc))
    log.error("internal error", exc_info=exc)
    return _WireInternal("internal server error; see the server log")

