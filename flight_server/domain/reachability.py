"""A destination that does not answer, said in the project's terms (issue 22 §1).

The libraries under the adapters (deltalake's object store, botocore and fsspec, libpq through ADBC or
psycopg, SQLAlchemy) word a failed connection with where they tried to go: an S3 endpoint URL with bucket
and prefix, a host and port. A client is told which destination of the project - and which dataset - did
not answer, never where it lives (the server log keeps the library's text).
"""

from __future__ import annotations

import errno
import re
import socket

from flight_server.domain.errors import Unavailable

# what the libraries say when they cannot reach their store (their own words, first line of a message)
_TEXT = re.compile(
    r"connection refused|failed to connect|could not connect|error sending request|dns error|"
    r"tcp connect error|connect(?:ion)? timed? ?out|connection reset|connection aborted|no route to host|"
    r"name or service not known|temporary failure in name resolution|could not resolve host|"
    r"server closed the connection|connection to server at|endpoint ?connection ?error|"
    r"connect ?timeout|unable to connect|network is unreachable", re.IGNORECASE)
# a store that answered and refused (libpq words it "connection to server at ... failed: FATAL: password
# authentication failed"): not unreachable - the caller's own error says why (a wrong password)
_REFUSED = re.compile(r"authentication failed|password|permission denied|role \S+ does not exist|"
                      r"database \S+ does not exist|access denied|invalidaccesskeyid|signaturedoesnotmatch",
                      re.IGNORECASE)
_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH,
           errno.ETIMEDOUT, errno.EPIPE}
_TYPES = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
          "ClientConnectorError", "ServerDisconnectedError", "NewConnectionError"}


def is_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is a store that did not answer, not a refusal of the request."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if isinstance(cause, OSError) and cause.errno in _ERRNOS:
            return True
        if {k.__name__ for k in type(cause).__mro__} & _TYPES:
            return True
        text = str(getattr(cause, "failed_message", None) or cause)
        if _REFUSED.search(text):
            return False
        if _TEXT.search(text):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def unreachable(destination: str, dataset: str | None, doing: str = "") -> Unavailable:
    """The error a client gets: the destination by its name in the project, the dataset, nothing of where."""
    of = f" of dataset '{dataset}'" if dataset else ""
    while_ = f" while {doing}" if doing else ""
    return Unavailable(f"destination '{destination}'{of} cannot be reached right now{while_} (its store did not "
                       "answer); retry later", destination=destination, dataset=dataset)
