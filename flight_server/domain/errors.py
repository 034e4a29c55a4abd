"""The domain's errors: what went wrong, in the user's terms, with fields. No transport here.

Exception tree (and the status each becomes in :mod:`flight_server.transport.status`, the one mapping)::

    ServiceError
    ├── NotFound              -> NOT_FOUND          (dataset / table / column that the profile cannot see)
    ├── InvalidRequest        -> INVALID_ARGUMENT   (malformed command, bad SQL, bad column)
    │   ├── SqlSyntaxError    -> INVALID_ARGUMENT   (fields: line, column, near)
    │   ├── SqlLimitExceeded  -> INVALID_ARGUMENT   (fields: limit = the server.* key, value)
    │   └── MemoryLimitExceeded -> INVALID_ARGUMENT (fields: limit = "server.memory_limit", value)
    ├── Unsupported           -> UNIMPLEMENTED
    ├── Forbidden             -> PERMISSION_DENIED  (+ extra_info JSON)
    │   └── ContractViolation -> PERMISSION_DENIED  (+ extra_info JSON with dlt's fields)
    ├── Unauthenticated       -> UNAUTHENTICATED
    ├── Unavailable           -> UNAVAILABLE
    └── Cancelled             -> CANCELLED          (the caller cancelled or went away)

Code below the transport raises these and nothing else on purpose; the transport turns them into
statuses in one place, and anything else into INTERNAL with a generic text.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of errors a client is meant to see."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def __str__(self) -> str:
        return self.message


class NotFound(ServiceError):
    """A dataset, table or column that does not exist for this caller."""


class InvalidRequest(ServiceError):
    """A request the server understood but cannot accept as sent."""


class SqlSyntaxError(InvalidRequest):
    """SQL that does not parse: where (line, column) and near what (``near``)."""


class SqlLimitExceeded(InvalidRequest):
    """A query stopped at one of the sandbox's limits: ``limit`` names the server key, ``value`` its setting."""

    @classmethod
    def time_limit(cls, timeout: float, dataset: str | None) -> SqlLimitExceeded:
        """The query ran past ``server.sql_timeout`` (in the sandbox or in the warehouse: one text)."""
        return cls(f"query exceeded the time limit of {timeout:g} s (server.sql_timeout)", dataset=dataset,
                   limit="server.sql_timeout", value=timeout)

    @classmethod
    def idle_result(cls, seconds: float, dataset: str | None) -> SqlLimitExceeded:
        """The caller stopped reading the result for ``seconds`` (in the sandbox or in the warehouse: one text)."""
        return cls(f"the query's result was not read for {seconds:g} s, so the query was ended and its "
                   "resources given to others; read a result as it arrives (or aggregate, or add a LIMIT)",
                   dataset=dataset, limit="idle result stream", value=seconds)


class MemoryLimitExceeded(InvalidRequest):
    """A request whose data needs more Arrow memory than the server process may hold (``server.memory_limit``;
    e.g. a compressed upload that decodes to gigabytes). Nothing of it was kept."""


class Unsupported(ServiceError):
    """A request for something this server does not implement."""


class Forbidden(ServiceError):
    """The caller's profile does not allow this."""


class ContractViolation(Forbidden):
    """A write that the profile's schema contract rejects (fields as in dlt's DataValidationError)."""


class Unauthenticated(ServiceError):
    """Missing or bad credentials."""


class Unavailable(ServiceError):
    """A destination that cannot be reached right now."""


class Cancelled(ServiceError):
    """The caller cancelled the call or went away; its work was stopped."""
